"""Pure-logic tests of spec parsing and configuration (no machines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmenv.config import load_config
from pytest_vmenv.errors import ConfigError
from pytest_vmenv.spec import SpecParser, parse_size
from pytest_vmenv.templates import template_key

BACKENDS = {"emulator": ("host",), "libvirt": ("tiny",)}


def parser(config_text: str = "", tmp_path: Path | None = None) -> SpecParser:
    if tmp_path is not None and config_text:
        (tmp_path / "vmenv.toml").write_text(config_text)
    config = load_config(tmp_path or Path("/nonexistent"))
    return SpecParser(config, "emulator", BACKENDS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", int(1.5 * 2**30)), (4096, 4096),
     ("64k", 65536), ("10MB", 10 * 2**20)],
)  # fmt: skip
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text, "here", "memory") == expected


@pytest.mark.parametrize("bad", ["12Q", "lots", "", "-1G", 0, True, "0M"])
def test_bad_sizes_name_field_and_value(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"here: memory=.* is not a size"):
        parse_size(bad, "here", "memory")


def test_defaults() -> None:
    spec = parser().machine({}, "t")
    assert (spec.name, spec.image, spec.backend, spec.cpus, spec.memory) == (
        "vm", "host", "emulator", 1, 512 * 2**20,
    )  # fmt: skip
    assert spec.scope == "function" and spec.isolation == "clone" and spec.network is None
    assert spec.outbound is False


def test_outbound_is_part_of_the_template_key_only_when_set() -> None:
    plain, out = parser().machine({}, "t"), parser().machine({"outbound": True}, "t")
    assert out.outbound is True
    assert template_key(plain) == template_key(parser().machine({"outbound": False}, "t"))
    assert template_key(plain) != template_key(out)


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"colour": "red"}, r"unknown field 'colour'. Choose one of: name, image"),
        ({"cpus": "lots"}, r"cpus='lots' must be a whole number"),
        ({"memory": "12Q"}, r"memory='12Q' is not a size"),
        ({"backend": "xen"}, r"backend='xen' is not installed. Choose one of: emulator, libvirt"),
        ({"image": "nope"}, r"unknown image 'nope' for backend 'emulator'. Choose one of: host"),
        ({"scope": "class"}, r"scope='class'. Choose one of: function, module, session"),
        ({"isolation": "none"}, r"Choose one of: clone, revert"),
        ({"name": "bad name"}, r"name='bad name' is not a machine name"),
        ({"provision": [1]}, r"provision step 1 must be"),
        ({"ready": "port:http"}, r"the port must be a number"),
        ({"timeout": -1}, r"timeout=-1 must be a positive"),
        ({"outbound": "yes"}, r"outbound='yes' must be true or false"),
    ],
)
def test_bad_fields(fields: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parser().machine(fields, "tests/test_x.py::test_y")


def test_backend_builtin_image_is_per_backend() -> None:
    assert parser().machine({"backend": "libvirt", "image": "tiny"}, "t").image == "tiny"
    with pytest.raises(ConfigError, match="unknown image 'tiny' for backend 'emulator'"):
        parser().machine({"image": "tiny"}, "t")


def test_path_image_becomes_rootfs(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    spec = parser("backend = 'emulator'\n", tmp_path).machine({"image": "root"}, "t")
    assert spec.image_config == {"rootfs": str(tmp_path / "root")}


def test_config_images_environments_and_rendering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMG_DIR", "imgs")
    text = """
vars = { size = "1G" }
[images.debian]
emulator = { rootfs = "{{ env.IMG_DIR }}/debian.tar" }
[machines.web]
image = "debian"
memory = "{{ vars.size }}"
[environments.stack]
network = "10.77.0.0/24"
machines = { web = "web", db = { image = "host", memory = "2G" } }
"""
    p = parser(text, tmp_path)
    web, db = p.environment("stack", "t")
    assert web.name == "web" and web.memory == 2**30
    assert web.image_config == {"rootfs": str(tmp_path / "imgs/debian.tar")}
    assert db.name == "db" and db.network == "10.77.0.0/24" and db.memory == 2 * 2**30
    with pytest.raises(ConfigError, match=r"unknown environment 'nope' .*Choose one of: stack"):
        p.environment("nope", "t")
    with pytest.raises(ConfigError, match="image 'debian' has no entry for backend 'libvirt'"):
        p.machine({"image": "debian", "backend": "libvirt"}, "t")


def test_template_error_names_key_and_file(tmp_path: Path) -> None:
    (tmp_path / "vmenv.toml").write_text('[backends.vsphere]\nhost = "{{ env.NO_SUCH_VAR_X }}"\n')
    with pytest.raises(
        ConfigError, match=r"vmenv.toml: key 'backends.vsphere.host'.*NO_SUCH_VAR_X"
    ):
        load_config(tmp_path)


def test_cli_vars_override_file_vars(tmp_path: Path) -> None:
    (tmp_path / "vmenv.toml").write_text(
        'vars = { a = "file" }\n[backends.x]\nv = "{{ vars.a }}"\n'
    )
    assert load_config(tmp_path).backends["x"]["v"] == "file"
    assert load_config(tmp_path, cli_vars={"a": "cli"}).backends["x"]["v"] == "cli"


def test_pyproject_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.vmenv]\nbackend = "libvirt"\n')
    assert load_config(tmp_path).backend == "libvirt"
    (tmp_path / "pyproject.toml").write_text('[tool.vmenv]\nbakend = "libvirt"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'tool\.vmenv\.bakend'"):
        load_config(tmp_path)
