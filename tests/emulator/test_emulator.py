"""Real-namespace tests of the emulator backend: isolation, commands, files, layers, limits.

Everything here runs real guests (root, Linux); state lives under
/var/lib/pytest-vmenv-test/, never /tmp.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmenv.backend import MachineRef, Network, Result, Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.errors import (
    BackendError,
    CommandTimeout,
    ConfigError,
    MachineGone,
    ProvisionError,
)
from pytest_vmenv.poll import poll_until
from pytest_vmenv.spec import MachineSpec

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's real-namespace tests need Linux and root",
)

TEST_ROOT = Path("/var/lib/pytest-vmenv-test")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Path]:
    path = TEST_ROOT / f"run-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    monkeypatch_module.setenv("VMENV_STATE_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def backend(state: Path) -> Iterator[EmulatorBackend]:
    b = EmulatorBackend(state_dir=state)
    b.check()
    yield b
    b.close()
    assert list((state / "emulator" / "guests").glob("*")) == []


@pytest.fixture(scope="module")
def session(state: Path) -> Session:
    return Session(id=f"s-{uuid.uuid4().hex[:8]}", state_dir=state)


@pytest.fixture(scope="module")
def template(backend: EmulatorBackend, session: Session) -> Snapshot:
    return backend.build_template(MachineSpec(name="vm"), "host-plain", session)


@pytest.fixture
def g(backend: EmulatorBackend, template: Snapshot, session: Session) -> Iterator[MachineRef]:
    ref = backend.clone(template, MachineSpec(name="alpha"), session)
    yield ref
    backend.destroy(ref)


def sh(backend: EmulatorBackend, ref: MachineRef, cmd: str, **kw: object) -> Result:
    return backend.execute(ref, ["/bin/sh", "-c", cmd], **kw)  # type: ignore[arg-type]


def ok(backend: EmulatorBackend, ref: MachineRef, cmd: str, **kw: object) -> str:
    r = sh(backend, ref, cmd, **kw)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout


# -- isolation -------------------------------------------------------------------------------
def test_hostname_pid1_and_network_are_the_guests_own(
    backend: EmulatorBackend, g: MachineRef
) -> None:
    assert ok(backend, g, "hostname").strip() == "alpha"
    assert "pytest_vmenv.emulator" in ok(backend, g, "tr '\\0' ' ' </proc/1/cmdline")
    assert ok(backend, g, "cat /proc/1/comm").strip() == "vmenv-init"
    assert ok(backend, g, "ls /sys/class/net").split() == ["lo"]
    assert g.ip is None


def test_writes_do_not_reach_the_host(backend: EmulatorBackend, g: MachineRef) -> None:
    name = f"vmenv-probe-{uuid.uuid4().hex}"
    ok(backend, g, f"echo x > /etc/{name} && echo y >> /etc/hostname && rm -f /etc/motd")
    assert not Path(f"/etc/{name}").exists()
    assert "y" not in Path("/etc/hostname").read_text().split()


def test_host_private_dirs_are_masked(backend: EmulatorBackend, g: MachineRef, state: Path) -> None:
    assert any(Path("/tmp").iterdir()) and any(Path("/root").iterdir())
    assert ok(backend, g, "ls -A /tmp /root /run /home").split() == [
        "/home:",
        "/root:",
        "/run:",
        "/tmp:",
    ]
    assert ok(backend, g, "stat -c %a /tmp").strip() == "1777"
    assert ok(backend, g, f"ls -A {state}").strip() == ""
    ok(backend, g, "echo hi > /tmp/x && cat /tmp/x")


def test_hardening_like_docker(backend: EmulatorBackend, g: MachineRef) -> None:
    assert sh(backend, g, "mknod /tmp/blk b 8 0").exit_code != 0
    assert sh(backend, g, "mknod /tmp/chr c 1 3").exit_code != 0
    assert ok(backend, g, "find /dev -type b").strip() == ""
    assert set(ok(backend, g, "ls /dev").split()) >= {"null", "zero", "urandom", "pts", "shm"}
    assert sh(backend, g, "echo 1 > /proc/sys/net/ipv4/ip_forward").exit_code != 0
    assert sh(backend, g, "echo x > /sys/kernel/uevent_helper").exit_code != 0
    caps = dict(
        line.split(":\t") for line in ok(backend, g, "grep Cap /proc/self/status").splitlines()
    )
    sys_admin, sys_module, mknod = 1 << 21, 1 << 16, 1 << 27
    for field in ("CapEff", "CapBnd", "CapPrm"):
        value = int(caps[field], 16)
        assert not value & (sys_admin | sys_module | mknod), (field, caps[field])
    assert sh(backend, g, "mount -t tmpfs none /mnt").exit_code != 0
    assert ok(backend, g, "cat /proc/kcore | wc -c").strip() == "0"


# -- commands --------------------------------------------------------------------------------
def test_exit_codes(backend: EmulatorBackend, g: MachineRef) -> None:
    assert sh(backend, g, "exit 3").exit_code == 3
    assert sh(backend, g, "kill -9 $$").exit_code == 137
    assert backend.execute(g, ["true"]).exit_code == 0
    missing = backend.execute(g, ["no-such-command-x"])
    assert missing.exit_code == 127 and "not found" in missing.stderr


def test_binary_output_stdin_and_env(backend: EmulatorBackend, g: MachineRef) -> None:
    r = sh(backend, g, "printf '\\000\\377a'; printf '\\001\\376' >&2")
    assert (r.stdout_bytes, r.stderr_bytes) == (b"\x00\xffa", b"\x01\xfe")
    blob = os.urandom(3 << 20)
    assert backend.execute(g, ["cat"], input=blob).stdout_bytes == blob
    assert ok(backend, g, "echo $FOO:$HOME", env={"FOO": "bar baz"}).strip() == "bar baz:/root"


def test_user(backend: EmulatorBackend, g: MachineRef) -> None:
    assert ok(backend, g, "id -u; echo $HOME", user="nobody").split() == ["65534", "/nonexistent"]
    assert sh(backend, g, "true", user="no-such-user").exit_code != 0


def test_timeout_kills_the_process_group(backend: EmulatorBackend, g: MachineRef) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        sh(backend, g, "sleep 100 & sleep 100", timeout=0.5)
    assert time.monotonic() - start < 3
    count = ok(backend, g, "cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$' || true")
    assert count.strip() == "0"


def test_background_daemon_does_not_hang_run(backend: EmulatorBackend, g: MachineRef) -> None:
    start = time.monotonic()
    r = sh(backend, g, "sleep 30 & echo started")
    assert r.stdout == "started\n" and time.monotonic() - start < 2

    def sleeping(_: bool) -> str | None:  # the forked shell may not have exec'd sleep yet
        count = ok(backend, g, "cat /proc/[0-9]*/comm | grep -c '^sleep$' || true").strip()
        return None if count == "0" else count

    assert poll_until(sleeping, timeout=10, what="the background sleep") == "1"


def test_concurrent_commands(backend: EmulatorBackend, g: MachineRef) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: sh(backend, g, f"echo {i}"), range(64)))
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(64)]


# -- files -----------------------------------------------------------------------------------
def test_put_get_roundtrip(backend: EmulatorBackend, g: MachineRef, state: Path) -> None:
    src = state / "src.bin"
    src.write_bytes(os.urandom(100_000))
    src.chmod(0o751)
    backend.copy_in(g, src, "/srv-file")
    assert ok(backend, g, "stat -c %a /srv-file").strip() == "751"
    back = state / "back.bin"
    backend.copy_out(g, "/srv-file", back)
    assert back.read_bytes() == src.read_bytes()
    with pytest.raises(BackendError):
        backend.copy_in(g, state, "/dir")
    with pytest.raises(BackendError):
        backend.copy_out(g, "/etc", state / "etc-copy")
    with pytest.raises(BackendError):
        backend.copy_out(g, "/no/such/file", state / "missing")
    assert not (state / "missing").exists()


def test_symlinks_never_escape_the_guest(
    backend: EmulatorBackend, g: MachineRef, state: Path
) -> None:
    before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    ok(backend, g, "ln -s /etc/passwd /root/link; ln -s ../../../../etc/passwd /root/rel")
    src = state / "evil"
    src.write_text("owned\n")
    backend.copy_in(g, src, "/root/link")
    backend.copy_in(g, src, "/root/rel")
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before
    assert ok(backend, g, "cat /etc/passwd") == "owned\n"
    out = state / "got"
    backend.copy_out(g, "/root/link", out)
    assert out.read_text() == "owned\n"


def _mini_rootfs(tar: tarfile.TarFile) -> None:
    """The few host binaries a guest needs, with their libraries."""
    wanted = {"/bin/sh", "/bin/cat", "/bin/ls", "/bin/readlink", "/bin/echo"}
    libs: set[str] = set()
    for binary in wanted:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        libs.update(p for p in out.split() if p.startswith("/"))
    for path in sorted(wanted | libs):
        tar.add(os.path.realpath(path), arcname=path.lstrip("/"))


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tarball_image_with_absolute_symlink(
    backend: EmulatorBackend, session: Session, state: Path
) -> None:
    image = state / "mini.tar.gz"
    with tarfile.open(image, "w:gz") as tar:
        _mini_rootfs(tar)
        _add_text(tar, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        link = tarfile.TarInfo("etc/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    spec = MachineSpec(name="mini", image=str(image), provision=("echo p > /etc/prov",))
    snap = backend.build_template(spec, "mini", session)
    ref = backend.clone(snap, spec, session)
    try:
        assert ok(backend, ref, "cat /etc/link") == "root:x:0:0:root:/root:/bin/sh\n"
        assert ok(backend, ref, "cat /etc/prov") == "p\n"
        assert ok(backend, ref, "ls /").split() == [
            "bin",
            "dev",
            "etc",
            "lib",
            "lib64",
            "proc",
            "run",
            "sys",
            "tmp",
        ]
    finally:
        backend.destroy(ref)
        backend.remove_template(snap)


def test_tarball_escaping_through_a_symlink_is_refused(
    backend: EmulatorBackend, session: Session, state: Path
) -> None:
    victim = state / "victim"
    victim.mkdir()
    image = state / "evil.tar"
    with tarfile.open(image, "w") as tar:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, str(victim)
        tar.addfile(link)
        _add_text(tar, "escape/pwned", "x")
        hard = tarfile.TarInfo("hard")
        hard.type, hard.linkname = tarfile.LNKTYPE, "../../../../../../etc/passwd"
        tar.addfile(hard)
    with pytest.raises(ConfigError, match="cannot unpack"):
        backend.build_template(MachineSpec(image=str(image)), "evil", session)
    assert list(victim.iterdir()) == []


# -- layers ----------------------------------------------------------------------------------
def test_provisioned_template_and_reuse(backend: EmulatorBackend, session: Session) -> None:
    spec = MachineSpec(
        name="web",
        provision=(
            "mkdir -p /srv && echo v1 > /srv/version",
            ("sh", "-c", "echo two >> /srv/version"),
        ),
    )
    snap = backend.build_template(spec, "web-v1", session)
    start = time.monotonic()
    again = backend.build_template(spec, "web-v1", session)
    assert again.handle == snap.handle and time.monotonic() - start < 0.5
    ref = backend.clone(snap, spec, session)
    try:
        assert ok(backend, ref, "cat /srv/version") == "v1\ntwo\n"
    finally:
        backend.destroy(ref)
    bad = MachineSpec(name="bad", provision=("echo out; echo err >&2; exit 4",))
    with pytest.raises(ProvisionError, match="exited with 4") as info:
        backend.build_template(bad, "bad", session)
    assert "out" in str(info.value) and "err" in str(info.value)
    slow = MachineSpec(name="slow", provision=("sleep 30",), timeout=1)
    with pytest.raises(ProvisionError, match="timed out"):
        backend.build_template(slow, "slow", session)
    assert not any(r.name in ("bad", "slow") for r in backend.owned(session.id))


def test_clones_are_independent(
    backend: EmulatorBackend, template: Snapshot, session: Session
) -> None:
    a = backend.clone(template, MachineSpec(name="a"), session)
    b = backend.clone(template, MachineSpec(name="b"), session)
    try:
        ok(backend, a, "echo a > /etc/who")
        assert sh(backend, b, "cat /etc/who").exit_code != 0
        c = backend.clone(template, MachineSpec(name="c"), session)
        assert sh(backend, c, "cat /etc/who").exit_code != 0
        backend.destroy(c)
    finally:
        backend.destroy(a)
        backend.destroy(b)


def test_snapshot_and_revert(
    backend: EmulatorBackend, g: MachineRef, template: Snapshot, state: Path
) -> None:
    ok(backend, g, "echo one > /root/f; rm /etc/hostname; sleep 100 &")
    snap = backend.snapshot(g, "one")
    ok(backend, g, "echo two > /root/f; echo new > /root/g")
    backend.revert(g, snap)
    assert ok(backend, g, "cat /root/f") == "one\n"
    assert sh(backend, g, "test -e /root/g").exit_code == 1
    assert sh(backend, g, "test -e /etc/hostname").exit_code == 1  # the whiteout survived
    assert ok(backend, g, "hostname").strip() == "alpha"
    ok(backend, g, "echo three > /root/f")
    backend.revert(g, template)
    assert sh(backend, g, "test -e /root/f").exit_code == 1
    assert sh(backend, g, "test -e /etc/hostname").exit_code == 0


# -- limits and lifecycle --------------------------------------------------------------------
def test_memory_limit_kills_only_the_guest_process(
    backend: EmulatorBackend, template: Snapshot, session: Session
) -> None:
    spec = MachineSpec(name="small", memory=64 * 1024**2)
    ref = backend.clone(template, spec, session)
    try:
        r = sh(backend, ref, "head -c 400M /dev/zero | tail > /dev/null", timeout=60)
        assert r.exit_code == 137, r
        assert ok(backend, ref, "echo alive") == "alive\n"
    finally:
        backend.destroy(ref)


def test_destroy_is_idempotent_and_complete(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    ref = backend.clone(template, MachineSpec(name="gone"), session)
    ok(backend, ref, "setsid sleep 100 >/dev/null 2>&1 < /dev/null &")
    assert ref.id in {r.id for r in backend.owned(session.id)}
    assert ref.id not in {r.id for r in backend.owned("other-session")}
    pid = int(ref.data["pid"])
    backend.destroy(ref)
    backend.destroy(ref)
    assert ref.id not in {r.id for r in backend.owned()}
    assert not (state / "emulator" / "guests" / ref.id).exists()
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(MachineGone):
        backend.execute(ref, ["true"])
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(state) not in mounts


def test_console_log(backend: EmulatorBackend, g: MachineRef) -> None:
    """The guest's /dev/console reaches console_log(). The keeper copies it from a FIFO into
    the log as it arrives, so the newest line may take a moment to show."""
    ok(backend, g, "echo hello-console > /dev/console")
    deadline = time.monotonic() + 5
    log = backend.console_log(g)
    while "hello-console" not in log and time.monotonic() < deadline:
        time.sleep(0.02)
        log = backend.console_log(g)
    assert "guest alpha up" in log and "hello-console" in log


def test_guests_die_with_their_creator(state: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pytest_vmenv.emulator import EmulatorBackend
        from pytest_vmenv.backend import Session
        from pytest_vmenv.spec import MachineSpec
        state = Path({str(state / "orphan")!r})
        b = EmulatorBackend(state_dir=state)
        s = Session(id="orphan", state_dir=state)
        ref = b.clone(b.build_template(MachineSpec(), "k", s), MachineSpec(name="o"), s)
        b.execute(ref, ["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 </dev/null &"])
        print(ref.id, flush=True)
        time.sleep(300)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    gid = proc.stdout.readline().strip()
    assert gid
    helper = EmulatorBackend(state_dir=state / "orphan")
    (ref,) = [r for r in helper.owned("orphan") if r.id == gid]
    meta_dir = state / "orphan" / "emulator" / "guests" / gid
    import json

    meta = json.loads((meta_dir / "meta.json").read_text())
    procs = [Path(d) / "cgroup.procs" for d in meta["cgroups"]]
    assert procs and any(p.read_text().split() for p in procs)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 2
    while any(p.read_text().split() for p in procs) or Path(f"/proc/{meta['pid']}").exists():
        assert time.monotonic() < deadline, "guest processes outlived their creator"
        time.sleep(0.02)
    helper.destroy(ref)
    assert not meta_dir.exists()
    assert not any(Path(p).parent.exists() for p in procs)
    helper.close()


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip`")
def test_machines_on_one_network_reach_each_other_by_name(
    backend: EmulatorBackend, template: Snapshot, session: Session
) -> None:
    net = Network("lan", uuid.uuid4().hex[:6])
    a = backend.clone(template, MachineSpec(name="web", network="lan"), session, net)
    b = backend.clone(template, MachineSpec(name="db", network="lan"), session, net)
    try:
        assert a.ip and b.ip and a.ip != b.ip and a.ip.startswith("10.77.0.")
        assert ok(backend, a, "getent hosts db").split()[0] == b.ip
        server = "import socket;s=socket.socket();s.bind(('0.0.0.0',8080));s.listen();"
        server += "c,_=s.accept();c.send(b'hi')"
        ok(backend, b, f'python3 -c "{server}" >/dev/null 2>&1 & sleep 0.3')
        client = "import socket;print(socket.create_connection(('db',8080),timeout=5).recv(9))"
        assert ok(backend, a, f'python3 -c "{client}"').strip() == "b'hi'"
        assert sh(backend, a, "ip route get 1.1.1.1").exit_code != 0
    finally:
        backend.destroy(a)
        backend.destroy(b)


def _rss_kib(pid: int | str) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        return int(f.read().split("Rss:")[1].split()[0])


def test_zygote_carries_only_the_guest_side(backend: EmulatorBackend, g: MachineRef) -> None:
    """Every clone forks the zygote twice; its heap must not hold pytest and the host side
    (a bare interpreter that imported pytest alone is already bigger than it must be)."""
    zygote = backend.zygote_pid
    assert zygote is not None
    probe = "import os, pytest; print(os.getpid()); input()"
    with subprocess.Popen(
        [sys.executable, "-c", probe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as bare:
        assert bare.stdout is not None and bare.stdin is not None
        with_pytest = _rss_kib(bare.stdout.readline().strip())
        bare.stdin.close()
    assert _rss_kib(zygote) < with_pytest
