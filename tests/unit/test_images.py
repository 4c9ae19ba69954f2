"""Pure-logic tests of image recipes: spec fields, config recipes, keys, apt sources, progress."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_vmenv.config import load_config
from pytest_vmenv.errors import ConfigError
from pytest_vmenv.images import LinePrinter, Recipe, recipe_of
from pytest_vmenv.images.build import builder_problem, mmdebstrap_argv
from pytest_vmenv.images.progress import BuildEvent
from pytest_vmenv.images.sources import host_sources, mirrors_for
from pytest_vmenv.orchestrator import template_key
from pytest_vmenv.spec import MachineSpec, SpecParser

BACKENDS = {"emulator": ("host", "debian-12"), "libvirt": ("tiny",)}
WHERE = "tests/test_x.py::test_y: @pytest.mark.vm"


def parser(config_text: str = "", tmp_path: Path | None = None) -> SpecParser:
    if tmp_path is not None and config_text:
        (tmp_path / "vmenv.toml").write_text(config_text)
    return SpecParser(load_config(tmp_path or Path("/nonexistent")), "emulator", BACKENDS)


# -- spec fields ------------------------------------------------------------------------------


def test_builtin_debian_image_is_a_recipe_with_the_machines_packages() -> None:
    spec = parser().machine({"image": "debian-12", "packages": ["nginx", "cron"]}, WHERE)
    assert spec.packages == ("nginx", "cron") and spec.init is None
    assert spec.image_config == {"base": "debian-12", "packages": []}
    assert recipe_of(spec) == Recipe("debian-12", ("cron", "nginx"), "systemd")


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"image": "debian-12", "packages": ["Nginx"]},
         r"test_y: @pytest.mark.vm: packages: 'Nginx' is not a package name \(a Debian package "
         r"name has lower-case letters"),
        ({"image": "debian-12", "packages": ["nginx", "a"]}, r"'a' is not a package name"),
        ({"image": "debian-12", "packages": ["ngi nx"]}, r"'ngi nx' is not a package name"),
        ({"image": "debian-12", "packages": ["-x"]}, r"'-x' is not a package name"),
        ({"image": "debian-12", "packages": "nginx"},
         r"packages='nginx' must be a list of Debian package names"),
        ({"image": "debian-12", "packages": [3]}, r"3 is not a package name"),
        ({"image": "host", "packages": ["nginx"]},
         r"packages=\['nginx'\] needs an image built from the Debian archive, and image 'host' "
         r"is not one: use image='debian-12'"),
        ({"image": "debian-12", "init": "upstart"},
         r"init='upstart'. Choose one of: systemd, none"),
    ],
)  # fmt: skip
def test_bad_packages_and_init_name_the_test_and_the_choices(
    fields: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parser().machine(fields, WHERE)


def test_package_names_per_debian_policy_are_accepted() -> None:
    names = ["g++", "libstdc++6", "python3.11", "0ad", "xz-utils"]
    assert parser().machine({"image": "debian-12", "packages": names}, WHERE).packages == tuple(
        names
    )


def test_config_recipe_and_per_backend_override(tmp_path: Path) -> None:
    text = """
[images.web]
base = "debian-12"
packages = ["nginx", "python3"]
[images.mixed]
base = "debian-12"
emulator = { rootfs = "rootfs" }
[machines.front]
image = "web"
packages = ["cron"]
init = "none"
[environments.stack]
machines = { front = "front" }
"""
    p = parser(text, tmp_path)
    web = p.machine({"image": "web", "packages": ["curl"]}, WHERE)
    assert web.image_config == {"base": "debian-12", "packages": ["nginx", "python3"]}
    assert recipe_of(web) == Recipe("debian-12", ("curl", "nginx", "python3"))
    mixed = p.machine({"image": "mixed"}, WHERE)
    assert mixed.image_config == {"rootfs": str(tmp_path / "rootfs")} and recipe_of(mixed) is None
    (front,) = p.environment("stack", "t")
    assert front.packages == ("cron",) and front.init == "none"
    assert recipe_of(front) == Recipe("debian-12", ("cron", "nginx", "python3"), "none")
    with pytest.raises(ConfigError, match=r"image 'web' has no entry for backend 'libvirt'"):
        p.machine({"image": "web", "backend": "libvirt"}, WHERE)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('[images.web]\nbase = "debian-99"\n',
         r"vmenv.toml: images.web.base = 'debian-99' is not an image built from an archive. "
         r"Choose one of: debian-12"),
        ('[images.web]\nbase = "debian-12"\npackages = ["ok", "Bad_Name"]\n',
         r"images.web.packages: 'Bad_Name' is not a package name"),
        ('[images.web]\npackages = ["nginx"]\n', r"images.web.packages needs a base"),
        ('[images.web]\nbase = "debian-12"\nemulator = "x"\n',
         r"images.web.emulator must be a table"),
        ('[machines.m]\nimage = "debian-12"\ninit = "sysv"\n[environments.e]\n'
         'machines = { m = "m" }\n', r"environments.e.machines.m\): init='sysv'. Choose one of"),
    ],
)  # fmt: skip
def test_bad_config_recipes_name_the_key(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parser(text, tmp_path).environment("e", "t")


def test_template_key_changes_with_packages_and_init_only_when_set() -> None:
    plain = MachineSpec(image="debian-12", image_config={"base": "debian-12", "packages": []})
    keys = {
        template_key(plain),
        template_key(replace(plain, packages=("nginx",))),
        template_key(replace(plain, init="none")),
    }
    assert len(keys) == 3
    legacy = MachineSpec()  # a spec without the new fields keeps the key it always had
    assert template_key(legacy) == "fce65d294daec91c2a98"


# -- recipes and keys -------------------------------------------------------------------------

MIRRORS = ["deb http://deb.example/debian bookworm main"]


def test_image_key_is_what_shapes_the_tree() -> None:
    base = Recipe("debian-12", ("nginx", "cron"))
    assert base.key(MIRRORS) == Recipe("debian-12", ("cron", "nginx", "cron")).key(MIRRORS)
    others = [
        Recipe("debian-12", ("cron",)).key(MIRRORS),
        Recipe("debian-12", ("nginx", "cron"), "none").key(MIRRORS),
        base.key([*MIRRORS, "deb http://deb.example/debian bookworm-updates main"]),
    ]
    assert len({base.key(MIRRORS), *others}) == 4


def test_systemd_recipe_adds_its_init_and_the_system_bus() -> None:
    assert Recipe("debian-12", ("cron",)).includes() == ("cron", "dbus", "systemd-sysv")
    assert Recipe("debian-12", ("cron",), "none").includes() == ("cron",)
    argv = mmdebstrap_argv(Recipe("debian-12", ("cron",), "none"), MIRRORS, Path("/x/rootfs"))
    builder = argv[argv.index("mmdebstrap") :]
    assert "--variant=minbase" in builder and "--include=cron" in builder
    assert builder[-3:] == ["bookworm", "/x/rootfs", MIRRORS[0]]
    if os.geteuid() == 0:  # --mode=root's mounts stay in a namespace that dies with the build
        assert builder[1] == "--mode=root"
        assert argv[: argv.index("mmdebstrap")] == [
            "setpriv", "--pdeathsig", "KILL", "--", "unshare", "--mount", "--propagation",
            "private", "--pid", "--fork", "--kill-child", "--",
        ]  # fmt: skip


# -- the host's apt sources -------------------------------------------------------------------


def test_sources_from_one_line_and_deb822_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# a comment\ndeb-src http://src.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg arch=amd64] http://one.example/debian bookworm main contrib\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.example/archive\nURIs: http://deb.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\nURIs: http://other.example/debian\nSuites: trixie\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "extra.list.disabled").write_text(
        "deb http://disabled.example/debian bookworm main\n"
    )
    assert mirrors_for("bookworm", host_sources(tmp_path)) == [
        "deb [signed-by=/k.gpg arch=amd64] http://one.example/debian bookworm main contrib",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.example/debian bookworm main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.example/debian bookworm-updates main",
        "deb http://deb.example/debian-security bookworm-security main",
    ]
    with pytest.raises(ConfigError, match=r"image debian-11 \(bullseye\).*no 'deb' entry for"):
        mirrors_for("bullseye", host_sources(tmp_path), "debian-11")


def test_this_hosts_apt_serves_bookworm() -> None:
    lines = mirrors_for("bookworm", host_sources())
    assert any(" bookworm " in f"{line} " for line in lines)


# -- progress -----------------------------------------------------------------------------------


def _event(step: str, elapsed: float, state: str = "building", tick: bool = False) -> BuildEvent:
    return BuildEvent("debian-12 + cron (systemd)", "k" * 24, state, step, elapsed, tick)


def test_progress_lines_at_each_step_and_heartbeat_without_a_terminal() -> None:
    lines: list[str] = []
    printer = LinePrinter(lines.append, heartbeat=0.0)
    printer(_event("running apt-get update", 1))
    assert lines == ["vmenv: building image debian-12 + cron (systemd) [kkkkkkkkkkkk] 1s: "
                     "running apt-get update"]  # fmt: skip
    quiet = LinePrinter(lines.append, heartbeat=3600)
    lines.clear()
    quiet(_event("downloading packages", 2))
    quiet(_event("downloading packages", 3, tick=True))  # no new step, no heartbeat due
    quiet(_event("extracting archives", 4))
    quiet(_event("in 40.0s", 40, state="built"))
    assert [line.split("] ")[1] for line in lines] == [
        "2s: downloading packages", "4s: extracting archives", "40s: in 40.0s",
    ]  # fmt: skip
    assert lines[-1].startswith("vmenv: built image")


def test_progress_on_a_terminal_is_one_status_line() -> None:
    lines: list[str] = []
    statuses: list[str] = []
    printer = LinePrinter(lines.append, lambda event: statuses.append(event.status(79)))
    for i, step in enumerate(["downloading packages", "downloading packages", "extracting"]):
        printer(_event(step, i, tick=i == 1))
    printer(_event("in 3.0s", 3, state="built"))
    assert statuses[1] == "vmenv: building debian-12 + cron (systemd) 1s: downloading packages"
    assert len(statuses) == 3 and len(lines) == 1 and "built image" in lines[0]


def test_status_line_shortens_the_image_to_keep_time_and_step() -> None:
    many = BuildEvent("debian-12 + " + ", ".join(f"pkg{i}" for i in range(30)) + " (systemd)",
                      "k" * 24, "building", "installing remaining packages", 42.0)  # fmt: skip
    line = many.status(79)
    assert len(line) == 79 and line.endswith("... 42s: installing remaining packages")
    assert line.startswith("vmenv: building debian-12 + pkg0, pkg1")


def test_builder_problem_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "apt-get install --no-install-recommends mmdebstrap" in (builder_problem() or "")
