"""Debian images built from the archive (mmdebstrap), on the emulator, with and without systemd.

Real builds: each image is built once into the state dir (``VMENV_STATE_DIR``, which CI
caches) by the session fixtures below and reused by every test and inner pytest run; only
the test of a changed package list builds one more, and removes it again. Needs root, Linux,
mmdebstrap and an apt source for bookworm.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_vmenv.backend import MachineRef, Result, Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.emulator.guest.mounts import DOCKER_CAPS
from pytest_vmenv.errors import BackendError, ConfigError
from pytest_vmenv.images import ImageCache, Recipe, builder_problem
from pytest_vmenv.images.cache import remove_tree
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

pytest_plugins = ["pytester"]
pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or os.geteuid() != 0,
        reason="Debian images on the emulator need Linux and root",
    ),
    pytest.mark.skipif(
        builder_problem() is not None, reason=f"cannot build images: {builder_problem()}"
    ),
]

SYSTEMD = Recipe("debian-12", ("cron",), "systemd")
PLAIN = Recipe("debian-12", ("cron", "openssh-server"), "none")
"""openssh-server: with no init to start it, ``vm.ssh_config()`` starts sshd itself."""
CAP_MASK = sum(1 << c for c in DOCKER_CAPS)


def _spec(recipe: Recipe, **fields: Any) -> MachineSpec:
    return MachineSpec(
        name=fields.pop("name", "deb"),
        image=recipe.base,
        image_config={"base": recipe.base, "packages": []},
        packages=recipe.packages,
        init=recipe.init,
        **fields,
    )


@pytest.fixture(scope="session")
def images() -> ImageCache:
    """The image cache of the state dir (kept between sessions: CI caches it)."""
    return ImageCache(state_dir())


@pytest.fixture(scope="session")
def systemd_image(images: ImageCache) -> Path:
    return images.ensure(SYSTEMD)


@pytest.fixture(scope="session")
def plain_image(images: ImageCache) -> Path:
    return images.ensure(PLAIN)


@pytest.fixture(scope="module")
def backend() -> Iterator[EmulatorBackend]:
    b = EmulatorBackend(state_dir=state_dir())
    b.check()
    yield b
    b.close()


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(id=f"deb-{uuid.uuid4().hex[:8]}", state_dir=state_dir())


@pytest.fixture(scope="module")
def systemd_template(
    backend: EmulatorBackend, session: Session, systemd_image: Path
) -> Iterator[Snapshot]:
    snap = backend.build_template(_spec(SYSTEMD), f"deb-systemd-{session.id}", session)
    yield snap
    backend.remove_template(snap)


@pytest.fixture
def guest(
    backend: EmulatorBackend, systemd_template: Snapshot, session: Session
) -> Iterator[MachineRef]:
    ref = backend.clone(systemd_template, _spec(SYSTEMD), session)
    yield ref
    backend.destroy(ref)


def sh(backend: EmulatorBackend, ref: MachineRef, cmd: str, **kw: Any) -> Result:
    return backend.execute(ref, ["/bin/sh", "-c", cmd], timeout=60, **kw)


def ok(backend: EmulatorBackend, ref: MachineRef, cmd: str, **kw: Any) -> str:
    r = sh(backend, ref, cmd, **kw)
    assert r.exit_code == 0, f"{cmd}: exit {r.exit_code}\n{r.stdout}\n{r.stderr}"
    return r.stdout


# -- the image ----------------------------------------------------------------------------------


def test_image_is_bookworm_with_the_packages_built_once(
    images: ImageCache, systemd_image: Path
) -> None:
    assert systemd_image == state_dir() / "images" / images.key(SYSTEMD) / "rootfs"
    assert "VERSION_CODENAME=bookworm" in (systemd_image / "etc/os-release").read_text()
    status = (systemd_image / "var/lib/dpkg/status").read_text()
    for package in ("cron", "systemd-sysv", "dbus"):
        assert f"Package: {package}\nStatus: install ok installed" in status
    assert not (systemd_image / "etc/hostname").exists()  # nothing of the build host's
    assert (systemd_image / "etc/resolv.conf").read_text() == ""
    recipe = json.loads((systemd_image.parent / "recipe.json").read_text())
    assert recipe["packages"] == ["cron"] and recipe["init"] == "systemd"
    assert any(" bookworm " in f"{m} " for m in recipe["mirrors"])
    assert oct(os.stat(state_dir() / "images").st_mode & 0o777) == "0o700"


def test_ensure_of_a_built_image_runs_no_builder(images: ImageCache, systemd_image: Path) -> None:
    before = len(images.builds())
    inode = os.stat(systemd_image).st_ino
    assert images.ensure(Recipe("debian-12", ("cron", "cron"))) == systemd_image
    assert len(images.builds()) == before and os.stat(systemd_image).st_ino == inode


# -- systemd as PID 1 ---------------------------------------------------------------------------


def test_systemd_boots_clean_with_the_packages_service_running(
    backend: EmulatorBackend, guest: MachineRef
) -> None:
    assert ok(backend, guest, "cat /proc/1/comm").strip() == "systemd"
    assert "VERSION_CODENAME=bookworm" in ok(backend, guest, "cat /etc/os-release")
    ok(backend, guest, "dpkg -s cron")
    assert ok(backend, guest, "systemctl is-system-running --wait").strip() == "running"
    restarting = "systemctl list-units --all --no-legend --plain --state=failed,activating"
    assert ok(backend, guest, restarting).strip() == ""  # no getty looping on /dev/console
    assert ok(backend, guest, "systemctl is-active cron dbus systemd-journald").split() == [
        "active", "active", "active",
    ]  # fmt: skip
    assert ok(backend, guest, "systemd-detect-virt").strip() == "container-other"
    assert "Startup finished" in ok(backend, guest, "journalctl --no-pager -b")


def test_a_user_made_with_useradd_runs_commands(
    backend: EmulatorBackend, guest: MachineRef
) -> None:
    ok(backend, guest, "useradd --create-home alice")
    r = backend.execute(guest, ["id", "-un"], user="alice", timeout=30)
    assert (r.exit_code, r.stdout) == (0, "alice\n")
    assert ok(backend, guest, "echo $HOME; touch ~/mine; stat -c %U ~/mine", user="alice") == (
        "/home/alice\nalice\n"
    )


def test_clones_are_separate_machines(
    backend: EmulatorBackend, systemd_template: Snapshot, session: Session
) -> None:
    a = backend.clone(systemd_template, _spec(SYSTEMD, name="a"), session)
    b = backend.clone(systemd_template, _spec(SYSTEMD, name="b"), session)
    try:
        ids = {ok(backend, r, "cat /etc/machine-id") for r in (a, b)}
        assert len(ids) == 2  # systemd's machine id is the container's, one per clone
        assert ok(backend, a, "hostname").strip() == "a"
        ok(backend, a, "systemctl stop cron")
        assert sh(backend, b, "systemctl is-active cron").stdout.strip() == "active"
    finally:
        backend.destroy(a)
        backend.destroy(b)


def test_agent_and_systemd_keep_the_hardening(backend: EmulatorBackend, guest: MachineRef) -> None:
    agent = ok(backend, guest, "grep -l '^vmenv-agent$' /proc/[0-9]*/comm").split("/")[2]
    for pid in ("1", agent):
        status = ok(backend, guest, f"cat /proc/{pid}/status")
        caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+(\w+)$", status, re.M)}
        assert caps["CapBnd"] == caps["CapEff"] == CAP_MASK, pid
        assert re.search(r"^Seccomp:\s+2$", status, re.M), pid
        assert re.search(r"^NoNewPrivs:\s+0$", status, re.M), pid  # so sudo still works
    assert agent == "2"
    attacks = (f"kill -9 {agent}", f"kill -STOP {agent}", f"prlimit --pid {agent} --nofile=4:4")
    for attack in attacks:
        r = sh(backend, guest, attack)
        assert r.exit_code != 0 and "not permitted" in r.stderr, (attack, r)
    assert "NOFILE" in ok(backend, guest, f"prlimit --pid {agent} --nofile")  # reading: fine
    assert ok(backend, guest, "echo still served") == "still served\n"
    fds = sh(backend, guest, f"ls -l /proc/{agent}/fd/")
    assert "socket:" not in fds.stdout and "Permission denied" in fds.stderr
    assert sh(backend, guest, f"cat /proc/{agent}/environ").exit_code != 0
    # seen from the host: systemd holds neither the agent's sockets nor a host file
    meta = state_dir() / "emulator/guests" / guest.id / "meta.json"
    pid1 = int(json.loads(meta.read_text())["pid"])
    host_agent = next(
        int(p) for p in Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split()
        if Path(f"/proc/{p}/comm").read_text().strip() == "vmenv-agent"
    )  # fmt: skip
    # the OOM killer takes a command or a service before the agent, as it would before PID 1
    keeper = json.loads(meta.read_text())["keeper"]
    score = {
        name: int(Path(f"/proc/{pid}/oom_score_adj").read_text())
        for name, pid in (("keeper", keeper), ("agent", host_agent), ("systemd", pid1))
    }
    cron = ok(backend, guest, "systemctl show -p MainPID --value cron").strip()
    score["cron"] = int(ok(backend, guest, f"cat /proc/{cron}/oom_score_adj"))
    score["command"] = int(ok(backend, guest, "cat /proc/self/oom_score_adj"))
    if score["keeper"] == -1000:  # shielded: the agent is never chosen, the rest as commands
        assert score["agent"] == -1000 and score["systemd"] == score["cron"] == score["command"]
    else:  # commands are chosen first; the agent scores no higher than systemd
        assert score["agent"] == score["systemd"] == score["cron"] < score["command"], score
    agent_fds = {os.readlink(f) for f in Path(f"/proc/{host_agent}/fd").iterdir()}
    systemd_fds = {os.readlink(f) for f in Path(f"/proc/{pid1}/fd").iterdir()}
    assert {f for f in agent_fds if f.startswith("socket:")}, agent_fds
    assert not systemd_fds & {f for f in agent_fds if f.startswith("socket:")}
    assert not [f for f in systemd_fds if f.startswith(str(state_dir()))], systemd_fds


def test_files_and_a_planted_fifo_through_the_agent(
    backend: EmulatorBackend, guest: MachineRef, tmp_path: Path
) -> None:
    src = tmp_path / "in.txt"
    src.write_text("to the guest\n")
    backend.copy_in(guest, src, "/root/in.txt")
    assert ok(backend, guest, "cat /root/in.txt") == "to the guest\n"
    backend.copy_out(guest, "/etc/os-release", tmp_path / "os-release")
    assert "bookworm" in (tmp_path / "os-release").read_text()
    ok(backend, guest, "mkfifo /root/fifo")
    with pytest.raises(BackendError, match="not a regular file"):
        backend.copy_out(guest, "/root/fifo", tmp_path / "fifo-out")
    assert ok(backend, guest, "echo alive") == "alive\n"


def test_kept_systemd_guest_is_reached_and_destroyed_from_another_backend(
    backend: EmulatorBackend, systemd_template: Snapshot, session: Session
) -> None:
    ref = backend.clone(systemd_template, _spec(SYSTEMD, name="kept"), session)
    backend.keep(ref)
    other = EmulatorBackend(state_dir=state_dir())
    try:
        (found,) = [r for r in other.owned(session.id) if r.id == ref.id]
        assert found.kept
        r = other.execute(found, ["systemctl", "is-system-running"], timeout=30)
        assert r.stdout.strip() == "running"
        other.destroy(found)
        assert not list(r for r in other.owned(session.id) if r.id == ref.id)
    finally:
        other.close()
        backend.destroy(ref)


def test_systemd_sees_only_its_own_cgroup_subtree(
    backend: EmulatorBackend,
    systemd_template: Snapshot,
    session: Session,
) -> None:
    ref = backend.clone(systemd_template, _spec(SYSTEMD, memory=256 * 2**20), session)
    meta = json.loads((state_dir() / "emulator/guests" / ref.id / "meta.json").read_text())
    groups = meta["groups"]
    try:
        assert ok(backend, ref, "cat /proc/self/cgroup").splitlines()[-1].startswith("0::/")
        listing = ok(backend, ref, "ls /sys/fs/cgroup").split()
        assert "init.scope" in listing and "system.slice" in listing
        assert "memory.max" not in listing and "pids.max" not in listing
        assert sh(backend, ref, "echo max > /sys/fs/cgroup/memory.max").exit_code != 0
        v2 = Path(groups["v2"])
        assert (v2 / "guest" / "init.scope").is_dir()  # systemd's tree is below the limits
        memory = groups["v1"].get("memory")
        if memory:
            limit = int((Path(memory) / "memory.limit_in_bytes").read_text())
        else:
            limit = int((v2 / "memory.max").read_text())
        assert limit == 256 * 2**20
    finally:
        backend.destroy(ref)
    assert not Path(groups["v2"]).exists()  # systemd's nested groups went with it
    assert not (state_dir() / "emulator/guests" / ref.id).exists()


def test_snapshot_and_revert_boot_systemd_again(
    backend: EmulatorBackend, systemd_template: Snapshot, guest: MachineRef
) -> None:
    ok(backend, guest, "useradd bob && systemctl disable --now cron")
    snap = backend.snapshot(guest, "no-cron")
    ok(backend, guest, "userdel bob && systemctl enable --now cron")
    backend.revert(guest, snap)
    assert ok(backend, guest, "systemctl is-system-running").strip() == "running"
    ok(backend, guest, "id bob")
    assert sh(backend, guest, "systemctl is-active cron").stdout.strip() == "inactive"
    backend.revert(guest, systemd_template)
    assert ok(backend, guest, "systemctl is-system-running").strip() == "running"
    assert sh(backend, guest, "id bob").exit_code != 0
    assert ok(backend, guest, "systemctl is-active cron").strip() == "active"


def test_provisioned_template_on_systemd(
    backend: EmulatorBackend, session: Session, systemd_image: Path
) -> None:
    spec = _spec(SYSTEMD, provision=["useradd --system svc", "systemctl disable cron"])
    snap = backend.build_template(spec, f"deb-prov-{session.id}", session)
    try:
        ref = backend.clone(snap, spec, session)
        try:
            ok(backend, ref, "id svc")
            assert sh(backend, ref, "systemctl is-active cron").stdout.strip() == "inactive"
        finally:
            backend.destroy(ref)
    finally:
        backend.remove_template(snap)


# -- no init ------------------------------------------------------------------------------------


def test_init_none_runs_the_plugins_pid1(
    backend: EmulatorBackend, session: Session, plain_image: Path
) -> None:
    assert not (plain_image / "lib/systemd/systemd").exists()
    snap = backend.build_template(_spec(PLAIN), f"deb-plain-{session.id}", session)
    ref = backend.clone(snap, _spec(PLAIN), session)
    try:
        assert ok(backend, ref, "cat /proc/1/comm").strip() == "vmenv-init"
        assert "VERSION_CODENAME=bookworm" in ok(backend, ref, "cat /etc/os-release")
        ok(backend, ref, "dpkg -s cron && useradd carol")
        assert ok(backend, ref, "id -un", user="carol") == "carol\n"
        assert 22 not in Machine(backend, ref, _spec(PLAIN)).listening_ports()
        ssh = Machine(backend, ref, _spec(PLAIN)).ssh_config()
        login = subprocess.run(ssh.ssh_argv("cat /proc/1/comm"), capture_output=True, timeout=60)
        assert login.stdout == b"vmenv-init\n", login.stderr
    finally:
        backend.destroy(ref)
        backend.remove_template(snap)


def test_systemd_on_the_host_image_or_without_systemd_is_a_clear_error(
    backend: EmulatorBackend, session: Session, plain_image: Path
) -> None:
    with pytest.raises(ConfigError, match=r"init='systemd' cannot boot image 'host'"):
        backend.build_template(
            MachineSpec(init="systemd", provision=["true"]), f"h-{session.id}", session
        )
    rootfs = {"rootfs": str(plain_image)}
    spec = MachineSpec(name="nosd", image=str(plain_image), image_config=rootfs, init="systemd")
    snap = backend.build_template(spec, f"nosd-{session.id}", session)
    try:
        with pytest.raises(Exception, match=r"the image has no /lib/systemd/systemd"):
            backend.clone(snap, spec, session)
    finally:
        backend.remove_template(snap)


# -- through the plugin -------------------------------------------------------------------------

INNER = """
import pytest

@pytest.mark.vm("debian-12", packages=[{packages}]{extra})
def test_a(vm):
    assert "bookworm" in vm.succeed("cat /etc/os-release")
    vm.succeed("dpkg -s {first}")
{more}
"""
SYSTEMD_CHECKS = """
    assert vm.succeed("systemctl is-system-running --wait").strip() in ("running", "degraded")
    assert vm.succeed("systemctl is-active cron").strip() == "active"
    vm.succeed("useradd -m dave")
    assert vm.succeed("id -un", user="dave") == "dave\\n"
"""


def _inner(packages: list[str], extra: str = "", more: str = "", tests: int = 1) -> str:
    text = INNER.format(
        packages=", ".join(repr(p) for p in packages), extra=extra, first=packages[0], more=more
    )
    for i in range(1, tests):
        text += text[text.index("@pytest") :].replace("def test_a", f"def test_{i}")
    return text


def test_marker_on_the_cached_image_across_sessions(
    pytester: pytest.Pytester, images: ImageCache, systemd_image: Path
) -> None:
    pytester.makepyfile(_inner(["cron"], more=SYSTEMD_CHECKS))
    before = len(images.builds())
    stamp = os.stat(systemd_image.parent)
    for _session in range(2):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        assert "building image" not in result.stdout.str() + result.stderr.str()
    after = os.stat(systemd_image.parent)
    assert len(images.builds()) == before  # no mmdebstrap ran in either session
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)


def test_changed_package_list_builds_a_new_image_with_a_status_line(
    pytester: pytest.Pytester, images: ImageCache, plain_image: Path
) -> None:
    """A new package list is a new key and one build, shown as a status line on a terminal;
    later sessions (and their xdist workers) reuse it; `vmenv images rm` removes it."""
    changed = Recipe("debian-12", ("cron", "hello"), "none")
    key = images.key(changed)
    assert key != images.key(PLAIN)
    assert images.lookup(changed) is None, "left over from an earlier run"
    before = len(images.builds())
    test_file = pytester.makepyfile(_inner(["cron", "hello"], extra=', init="none"', tests=2))
    try:
        command = f"{sys.executable} -m pytest -p no:cacheprovider {test_file.name}"
        ran = subprocess.run(
            ["script", "--quiet", "--return", "--command", command, "/dev/null"],
            cwd=pytester.path, capture_output=True, timeout=900,
            env={**os.environ, "COLUMNS": "100"},
        )  # fmt: skip
        tty = ran.stdout.decode("utf-8", "replace")  # bytes: "\r" must not become a newline
        assert ran.returncode == 0, tty
        assert [b["key"] for b in images.builds()[before:]] == [key]
        image = r"debian-12 \+ cron, hello \(no init\)"
        for step in ("running apt-get update", "extracting archives", "installing"):
            assert re.search(rf"\rvmenv: building {image} \d+s: {step}", tty), step
        built = rf"\rvmenv: built image {image} \[{key[:12]}\] \d+s: in [\d.]+s *\r?\n"
        assert re.search(built, tty), tty
        assert "2 passed" in tty
        again = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
        again.assert_outcomes(passed=2)
        assert len(images.builds()) == before + 1
        assert "building image" not in again.stdout.str() + again.stderr.str()
    finally:
        listing = _vmenv("images")
        assert f"images/{key}" in listing.stdout
        removed = _vmenv("images", "rm", f"images/{key}")
        assert removed.returncode == 0, removed.stdout + removed.stderr
    assert images.lookup(changed) is None
    assert images.lookup(PLAIN) == plain_image


def test_concurrent_builds_of_one_image_build_it_once(images: ImageCache) -> None:
    """Two processes (two sessions, say) need one new image: one builds, the other shows
    that it waits, and both get the same tree; without a terminal, progress is lines."""
    recipe = Recipe("debian-12", ("hello",), "none")
    assert images.lookup(recipe) is None, "left over from an earlier run"
    before = len(images.builds())
    argv = [sys.executable, "-m", "pytest_vmenv", "images", "build", "debian-12",
            "--packages", "hello", "--init", "none"]  # fmt: skip
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert outs[0][0] == outs[1][0] == f"images/{images.key(recipe)}  {images.lookup(recipe)}\n"
        assert len(images.builds()) == before + 1
        errs = sorted((err for _out, err in outs), key=lambda e: "waiting" in e)
        assert "vmenv: building image debian-12 + hello (no init)" in errs[0]
        assert "\r" not in errs[0] and "vmenv: built image" in errs[0]
        assert "vmenv: waiting for image debian-12 + hello (no init)" in errs[1]
        assert "another process is building it" in errs[1]
        assert errs[1].splitlines()[-1].endswith("s: built by another process"), errs[1]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for image in images.listing():
            if image.key == images.key(recipe):
                images.remove(image)
    assert images.lookup(recipe) is None


def test_bad_package_names_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(_inner(["cron", "Not_A_Package"]))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_bad_package_names_are_usage_errors.py::test_a: @pytest.mark.vm: packages: "
         "'Not_A_Package' is not a package name (a Debian package name has lower-case*"]
    )  # fmt: skip
    assert "Traceback" not in result.stderr.str()


def test_a_package_the_archive_lacks_fails_the_build_clearly(
    pytester: pytest.Pytester, images: ImageCache
) -> None:
    pytester.makepyfile(_inner(["no-such-package-vmenv"], extra=', init="none"'))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*ConfigError: image debian-12 + no-such-package-vmenv (no init): the archive has no "
         "package 'no-such-package-vmenv' for bookworm*"]
    )  # fmt: skip
    key = images.key(Recipe("debian-12", ("no-such-package-vmenv",), "none"))
    shown = "image debian-12 + no-such-package-vmenv (no init) ?" + key[:12] + "?"
    result.stdout.fnmatch_lines([  # no terminal: whole lines, one per step
        f"vmenv: building {shown} *s: running apt-get update",
        f"vmenv: failed to build {shown} *s: mmdebstrap exited with *",
    ])  # fmt: skip
    assert not (images.root / key).exists()
    assert "Unable to locate package" in (images.root / f"{key}.failed.log").read_text()
    assert not list(images.root.glob(".build-*"))


def test_a_build_killed_with_its_caller_leaves_no_process_and_no_mount(
    images: ImageCache,
) -> None:
    """SIGKILL the process that builds (as a crash of pytest would) while mmdebstrap has the
    tree's /proc and /sys mounted: the builder dies with it, no mount is left in the host's
    namespace, and the torn build is listed and removable."""
    argv = [sys.executable, "-m", "pytest_vmenv", "images", "build", "debian-12",
            "--packages", "hello", "--init", "none"]  # fmt: skip
    before = set(images.root.glob(".build-*"))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "installing essential packages" in line:
                break
        else:
            pytest.fail("the build never got to installing packages")
        torn = list(set(images.root.glob(".build-*")) - before)
        assert len(torn) == 1
        seen = [m for pid in _builders(torn[0]) for m in _mounts_under(torn[0], pid)]
        assert any("/rootfs/proc " in m for m in seen), seen  # the builder's own mounts
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _builders(torn[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _builders(torn[0])
    assert not _mounts_under(torn[0])
    listing = _vmenv("images").stdout
    assert f"images/{torn[0].name}" in listing and "torn image build" in listing
    removed = _vmenv("images", "rm", f"images/{torn[0].name}")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not torn[0].exists()


def test_a_tree_with_a_mount_in_it_is_never_removed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "rootfs" / "sys").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tree / "rootfs" / "sys")], check=True)
    try:
        (tree / "rootfs" / "sys" / "precious").write_text("on the mounted filesystem")
        with pytest.raises(BackendError, match=r"filesystem\(s\) are mounted in it"):
            remove_tree(tree)
        assert (tree / "rootfs" / "sys" / "precious").exists()
    finally:
        subprocess.run(["umount", str(tree / "rootfs" / "sys")], check=True)
    remove_tree(tree)
    assert not tree.exists()


def _mounts_under(path: Path, pid: int | str = "self") -> list[str]:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return [line for line in f if f" {path}/" in line]
    except OSError:
        return []


def _builders(path: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(int(pid))
    return found


def _vmenv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_vmenv_images_rm_leaves_an_image_a_template_stacks_on(
    images: ImageCache, systemd_template: Snapshot
) -> None:
    key = images.key(SYSTEMD)
    left = _vmenv("images", "rm", f"images/{key}")
    assert left.returncode == 1
    assert re.search(
        rf"left image images/{key}: in use: emulator template \S+ stacks on it", left.stdout
    ), left.stdout
    assert images.lookup(SYSTEMD) is not None


def test_vmenv_images_rm_leaves_an_image_something_is_being_built_on(
    images: ImageCache, plain_image: Path
) -> None:
    with images.using(PLAIN) as rootfs:  # as a backend holds it while it makes a template
        left = _vmenv("images", "rm", f"images/{images.key(PLAIN)}")
        assert left.returncode == 1, left.stdout + left.stderr
        assert "something is being built on it" in left.stderr, left.stderr
        assert rootfs == plain_image and rootfs.is_dir()


def test_vmenv_images_build_and_list(
    images: ImageCache, systemd_image: Path, tmp_path: Path
) -> None:
    before = len(images.builds())
    built = _vmenv("images", "build", "debian-12", "--packages", "cron")
    assert built.returncode == 0, built.stderr
    assert built.stdout.split() == [f"images/{images.key(SYSTEMD)}", str(systemd_image)]
    assert "is built already" in built.stderr and len(images.builds()) == before
    listing = _vmenv("images").stdout
    assert re.search(
        rf"^image\s+-\s+[\d.]+ MiB\s+\S+\s+images/{images.key(SYSTEMD)}\s+debian-12 \+ cron "
        r"\(systemd\), built with mmdebstrap", listing, re.M
    ), listing  # fmt: skip
    (tmp_path / "vmenv.toml").write_text(
        '[images.cronbox]\nbase = "debian-12"\npackages = ["cron"]\n'
    )
    named = subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", "images", "build", "cronbox"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert named.returncode == 0 and named.stdout == built.stdout, named.stderr
    unknown = _vmenv("images", "build", "debian-99")
    assert unknown.returncode == 2
    assert "no image 'debian-99' to build. Choose one of: debian-12" in unknown.stderr
