"""Regression tests for the emulator's security review (real guests, root, Linux).

Each test names the finding it covers. State lives under /var/lib/pytest-vmenv-test/.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import importlib.util
import io
import json
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_vmenv import paths
from pytest_vmenv.backend import MachineRef, Result, Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend, wire
from pytest_vmenv.emulator.host import cgroups, hostmask, images, streams
from pytest_vmenv.emulator.host.control import CommandTimedOut
from pytest_vmenv.emulator.host.guestgroups import GuestGroups
from pytest_vmenv.errors import BackendError, CommandTimeout, ConfigError, MachineGone
from pytest_vmenv.spec import MachineSpec

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's real-namespace tests need Linux and root",
)

TEST_ROOT = Path("/var/lib/pytest-vmenv-test")
PY = "/usr/bin/python3"  # the host's system python, visible in host-image guests


@pytest.fixture
def g(backend: EmulatorBackend, template: Snapshot, session: Session) -> Iterator[MachineRef]:
    ref = backend.clone(template, MachineSpec(name="hard"), session)
    yield ref
    backend.destroy(ref)


def sh(backend: EmulatorBackend, ref: MachineRef, cmd: str, **kw: Any) -> Result:
    return backend.execute(ref, ["/bin/sh", "-c", cmd], **kw)


def ok(backend: EmulatorBackend, ref: MachineRef, cmd: str, **kw: Any) -> str:
    r = sh(backend, ref, cmd, **kw)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout


def py(backend: EmulatorBackend, ref: MachineRef, code: str) -> str:
    r = backend.execute(ref, [PY, "-c", textwrap.dedent(code)], timeout=30)
    assert r.exit_code == 0, r
    return r.stdout


def bounded(call: Callable[[], object], limit: float) -> object:
    """``call()`` in a thread; fail (instead of hanging the suite) if it takes over ``limit``."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"still running after {limit}s"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


# -- 1: PID 1 is not dumpable --------------------------------------------------------------
def test_guest_root_cannot_reach_pid1s_fds(backend: EmulatorBackend, g: MachineRef) -> None:
    assert sh(backend, g, "ls -l /proc/1/fd").exit_code != 0
    out = py(
        backend,
        g,
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        opened = []
        for n in range(16):
            try:
                os.close(os.open(f"/proc/1/fd/{n}", os.O_RDONLY | os.O_NONBLOCK))
                opened.append(n)
            except OSError:
                pass
        pidfd = libc.syscall(434, 1, 0)  # pidfd_open works: it only names the process
        assert pidfd >= 0, ctypes.get_errno()
        stolen = []
        for n in range(16):
            fd = libc.syscall(438, pidfd, n, 0)  # pidfd_getfd
            if fd >= 0:
                stolen.append(n)
            else:
                assert ctypes.get_errno() in (1, 9), ctypes.get_errno()  # EPERM (EBADF)
        print(opened, stolen)
        """,
    )
    assert out.split() == ["[]", "[]"]


def test_file_transfers_still_work(backend: EmulatorBackend, g: MachineRef, state: Path) -> None:
    src = state / "big"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    os.chmod(src, 0o751)
    backend.copy_in(g, src, "/root/big")
    assert ok(backend, g, "sha256sum /root/big; stat -c %a /root/big").split()[::2] == [
        hashlib.sha256(data).hexdigest(),
        "751",
    ]
    back = state / "back"
    backend.copy_out(g, "/root/big", back)
    assert back.read_bytes() == data
    empty = state / "empty"
    empty.write_bytes(b"")
    backend.copy_in(g, empty, "/root/empty")
    backend.copy_out(g, "/root/empty", back)
    assert back.read_bytes() == b""


# -- 2: tarballs are unpacked in a chroot ---------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, text: str = "", **attrs: Any) -> None:
    info = tarfile.TarInfo(name)
    data = text.encode()
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_tarball_cannot_write_outside_its_rootfs(backend: EmulatorBackend, state: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    victim = TEST_ROOT / f"victim-{tag}"
    victim.mkdir()
    dotdot = TEST_ROOT / f"dotdot-{tag}"
    absolute = TEST_ROOT / f"abs-{tag}"
    passwd = Path("/etc/passwd")
    before = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_nlink)
    image = state / f"evil-{tag}.tar"
    with tarfile.open(image, "w") as tar:
        _add(tar, "../" * 12 + str(dotdot).lstrip("/"), "dotdot")
        _add(tar, str(absolute), "absolute")
        _add(tar, str(victim).lstrip("/"), type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "lnk", type=tarfile.SYMTYPE, linkname=str(victim))
        _add(tar, "lnk/pwned", "through the symlink")
        _add(tar, "etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        _add(tar, "hl", type=tarfile.LNKTYPE, linkname="/etc/passwd")
        _add(tar, "hl2", type=tarfile.LNKTYPE, linkname="../../../../../../etc/passwd")
        _add(tar, "suid", "#!/bin/sh\n", mode=0o4755)
        _add(tar, "sgid", "#!/bin/sh\n", mode=0o2755)
        _add(tar, "devnull", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(tar, "fifo", type=tarfile.FIFOTYPE, mode=0o666)
    try:
        rootfs = images.unpack_tarball(image, backend.emu_dir)
        assert list(victim.iterdir()) == []
        assert not dotdot.exists() and not absolute.exists()
        after = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_nlink)
        assert after == before
        inside = rootfs / str(victim).lstrip("/")
        assert (inside / "pwned").read_text() == "through the symlink"
        assert (rootfs / str(dotdot).lstrip("/")).read_text() == "dotdot"
        assert (rootfs / str(absolute).lstrip("/")).read_text() == "absolute"
        assert os.readlink(rootfs / "lnk") == str(victim)  # kept: resolved inside the guest
        ino = (rootfs / "etc/passwd").stat().st_ino
        assert (rootfs / "hl").stat().st_ino == ino == (rootfs / "hl2").stat().st_ino
        assert stat.S_IMODE((rootfs / "suid").stat().st_mode) == 0o755
        assert stat.S_IMODE((rootfs / "sgid").stat().st_mode) == 0o755
        assert not (rootfs / "devnull").exists() and not (rootfs / "fifo").exists()
    finally:
        shutil.rmtree(victim, ignore_errors=True)
        for p in (dotdot, absolute):
            p.unlink(missing_ok=True)


# -- 3: no device nodes outside /dev -------------------------------------------------------
def test_device_nodes_outside_dev_cannot_be_opened(
    backend: EmulatorBackend, g: MachineRef, template: Snapshot, session: Session
) -> None:
    node = TEST_ROOT / f"null-{uuid.uuid4().hex[:8]}"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    try:
        r = sh(backend, g, f"echo x > {node}")
        assert r.exit_code != 0 and "Permission denied" in r.stderr, r
        ok(backend, g, "echo x > /dev/null")  # the guest's own /dev still works
        # whiteouts (0/0 char devices in the upper dir) keep working, in snapshots too
        ok(backend, g, "rm /etc/hostname; ! test -e /etc/hostname")
        snap = backend.snapshot(g, "nodev")
        clone = backend.clone(snap, MachineSpec(name="nodev"), session)
        try:
            assert sh(backend, clone, "test -e /etc/hostname").exit_code == 1
        finally:
            backend.destroy(clone)
    finally:
        node.unlink()


# -- 4: private state dirs -----------------------------------------------------------------
def test_state_dirs_are_private_every_time(state: Path) -> None:
    emu = state / "emulator"
    emu.mkdir(exist_ok=True)
    for d in (emu, emu / "layers"):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)
    assert EmulatorBackend(state_dir=state).emu_dir == emu
    for sub in ("", "layers", "images", "guests"):
        assert stat.S_IMODE((emu / sub).stat().st_mode) == 0o700, sub


# -- 5: seccomp ----------------------------------------------------------------------------
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter is x86_64 only")
def test_keyrings_and_kernel_facilities_are_denied(backend: EmulatorBackend, g: MachineRef) -> None:
    out = py(
        backend,
        g,
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        def errno_of(*args):
            ctypes.set_errno(0)
            res = libc.syscall(*args)
            return ctypes.get_errno() if res < 0 else "ok"
        print(errno_of(250, 0, -3, 0))  # keyctl(GET_KEYRING_ID, session keyring)
        print(errno_of(248, b"user", b"vmenv", b"x", 1, -2))  # add_key
        print(errno_of(249, b"user", b"vmenv", None, -2))  # request_key
        print(errno_of(0x40000000 | 250, 0, -3, 0))  # keyctl through the x32 ABI
        print(errno_of(321, 0, None, 0))  # bpf
        print(errno_of(323, 0))  # userfaultfd
        """,
    )
    assert out.split() == ["1"] * 6
    status = ok(backend, g, "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status")
    assert status.split() == ["NoNewPrivs:", "0", "Seccomp:", "2"]  # setuid still works
    assert ok(backend, g, "echo fine; ls / >/dev/null") == "fine\n"


# -- 6: FIFOs cannot freeze PID 1 ----------------------------------------------------------
def test_fifos_do_not_freeze_pid1(backend: EmulatorBackend, g: MachineRef, state: Path) -> None:
    ok(backend, g, "mkfifo /root/fifo")
    start = time.monotonic()
    with pytest.raises(BackendError, match="not a regular file"):
        bounded(lambda: backend.copy_out(g, "/root/fifo", state / "fifo-out"), 10)
    src = state / "fifo-in"
    src.write_text("x")
    with pytest.raises(BackendError):
        bounded(lambda: backend.copy_in(g, src, "/root/fifo"), 10)
    assert time.monotonic() - start < 5
    assert not (state / "fifo-out").exists()
    ok(backend, g, "cp /etc/passwd /root/passwd; rm /etc/passwd; mkfifo /etc/passwd")
    r = bounded(lambda: backend.execute(g, ["id"], user="nobody", timeout=10), 10)
    assert isinstance(r, Result) and r.exit_code == 126, r
    assert backend.execute(g, ["true"], timeout=10).exit_code == 0


# -- 7: more than 1024 open fds ------------------------------------------------------------
def test_works_with_more_than_1024_fds_open(
    backend: EmulatorBackend, template: Snapshot, session: Session
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"RLIMIT_NOFILE hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    fds: list[int] = []
    try:
        fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]
        assert max(fds) > 1024
        ref = backend.clone(template, MachineSpec(name="fds"), session)
        try:
            assert backend.execute(ref, ["echo", "hi"]).stdout == "hi\n"
        finally:
            backend.destroy(ref)
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- 8: NUL bytes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"argv": ["echo", "a\0b"]},
        {"argv": ["echo"], "env": {"A": "x\0y"}},
        {"argv": ["echo"], "env": {"A\0": "x"}},
        {"argv": ["echo"], "env": {"A=B": "x"}},
        {"argv": ["echo"], "user": "ro\0ot"},
    ],
)
def test_nul_bytes_are_a_backend_error(
    backend: EmulatorBackend, g: MachineRef, kw: dict[str, Any]
) -> None:
    argv = kw.pop("argv")
    with pytest.raises(BackendError) as info:
        backend.execute(g, argv, **kw)
    assert not isinstance(info.value, MachineGone)
    assert backend.execute(g, ["true"]).exit_code == 0


# -- 9: snapshot freezing ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["timeout", "unsupported"])
def test_snapshot_refused_and_thawed_when_freezing_fails(
    backend: EmulatorBackend, g: MachineRef, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    real = GuestGroups.freeze

    def broken(self: GuestGroups, frozen: bool) -> None:
        if frozen and how == "timeout":
            real(self, True)  # half-done: the kernel froze it, we "timed out"
            raise OSError(errno.ETIMEDOUT, "cgroup did not freeze in time")
        if frozen:
            raise OSError(errno.ENOTSUP, "no cgroup freezer available")
        real(self, frozen)

    monkeypatch.setattr(GuestGroups, "freeze", broken)
    layers = backend.emu_dir / "layers"
    before = sorted(p.name for p in layers.iterdir())
    with pytest.raises(BackendError, match="could not be frozen"):
        backend.snapshot(g, "torn")
    assert sorted(p.name for p in layers.iterdir()) == before
    assert backend.execute(g, ["true"], timeout=5).exit_code == 0  # not left frozen


# -- 10: timeouts while output flows -------------------------------------------------------
def test_timeout_fires_while_output_keeps_flowing(backend: EmulatorBackend, g: MachineRef) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        bounded(lambda: sh(backend, g, "while :; do echo x; done", timeout=1.0), 15)
    assert time.monotonic() - start < 6
    assert backend.execute(g, ["true"]).exit_code == 0


_FLOOD = r"""
import json, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
sock.setblocking(False)
end = time.monotonic() + 8
while time.monotonic() < end:
    try:
        sock.send(b'{"noise":1}')
    except BlockingIOError:
        pass
    try:
        if b"kill" in sock.recv(4096):
            sock.setblocking(True)
            sock.send(json.dumps({"killed": True}).encode())
            break
    except BlockingIOError:
        pass
"""


def test_timeout_fires_while_pid1_keeps_talking() -> None:
    """A fake PID 1 (another process) floods the reply socket: ``poll`` is never empty."""
    mine, theirs = wire.socketpair()
    os.set_inheritable(theirs.fileno(), True)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLOOD, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    start = time.monotonic()
    try:
        with pytest.raises(CommandTimedOut):  # the bug: GuestDied once the flood ends
            streams.communicate(mine, in_w, out_r, err_r, None, 0.3)
        assert time.monotonic() - start < 3
    finally:
        proc.kill()
        proc.wait()
        for fd in (out_w, err_w, in_r):
            os.close(fd)
        mine.close()


# -- 11: machine ids are checked -----------------------------------------------------------
@pytest.mark.parametrize("gid", ["../layers", "..", "", "a/b", "/etc", ".hidden"])
def test_bad_machine_ids_touch_nothing(state: Path, gid: str) -> None:
    b = EmulatorBackend(state_dir=state)
    sentinel = b.emu_dir / "layers" / "sentinel"
    sentinel.write_text("keep me")
    ref = MachineRef(backend="emulator", id=gid, name="x", session="s")
    try:
        with pytest.raises(BackendError, match="invalid machine id"):
            b.destroy(ref)
        with pytest.raises(BackendError, match="invalid machine id"):
            b.execute(ref, ["true"])
        assert sentinel.read_text() == "keep me"
        assert b.console_log(ref) == ""
    finally:
        sentinel.unlink()
        b.close()


# -- 12: host home dirs outside /home ------------------------------------------------------
def test_service_and_user_homes_are_masked(
    backend: EmulatorBackend, session: Session, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    svc, user = TEST_ROOT / f"svc-{tag}", TEST_ROOT / f"user-{tag}"
    for home in (svc, user):
        home.mkdir()
        (home / "secret").write_text("host data")
    os.chown(user, 1234, 1234)
    os.chmod(user, 0o750)
    passwd = state / f"passwd-{tag}"
    passwd.write_text(
        f"root:x:0:0::/root:/bin/sh\nsvc:x:120:120::{svc}:/bin/false\n"
        f"alice:x:1234:1234::{user}:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\n"
        "sys:x:3:3::/dev:/bin/false\ngames:x:1500:60::/usr/games:/bin/false\n"
        "odd:x:1501:1501::/:/bin/false\n"
    )
    monkeypatch.setattr(hostmask, "PASSWD", passwd)
    try:
        assert hostmask._homes(passwd) == sorted([str(svc)[1:], str(user)[1:]])
        snap = backend.build_template(MachineSpec(name="homes"), f"homes-{tag}", session)
        ref = backend.clone(snap, MachineSpec(name="homes"), session)
        try:
            assert ok(backend, ref, f"ls -A {svc} {user}").split() == [f"{svc}:", f"{user}:"]
            assert ok(backend, ref, f"stat -c '%u %a' {user}").split() == ["1234", "750"]
            assert ok(backend, ref, "ls /usr/games >/dev/null; echo ok") == "ok\n"
        finally:
            backend.destroy(ref)
            backend.remove_template(snap)
    finally:
        shutil.rmtree(svc)
        shutil.rmtree(user)


def test_pid1_never_runs_a_binary_of_the_image_while_privileged(
    backend: EmulatorBackend, session: Session
) -> None:
    """Booting must not exec anything from the guest's root (e.g. ctypes' `ldconfig -p`):
    PID 1 holds every capability until it drops them, so such a binary would own the host."""
    plant = (
        "mv /sbin/ldconfig /sbin/ldconfig.real && "
        "printf '#!/bin/sh\\ntouch /ldconfig-ran\\nexec /sbin/ldconfig.real \"$@\"\\n' "
        "> /sbin/ldconfig && chmod 755 /sbin/ldconfig"
    )
    spec = MachineSpec(name="planted", provision=(plant,))
    snap = backend.build_template(spec, f"planted-{session.id}", session)
    try:
        ref = backend.clone(snap, spec, session)
        try:
            assert ok(backend, ref, "cat /proc/sys/kernel/hostname").strip() == "planted"
            assert sh(backend, ref, "test -e /ldconfig-ran").exit_code != 0
        finally:
            backend.destroy(ref)
    finally:
        backend.remove_template(snap)


# -- 13: no user namespaces, no io_uring (seccomp argument rules) --------------------------
# Probes run in a forked child each (a probe that works on a broken filter must not change
# the test's process), on the x86_64 ABI and on i386 through `int 0x80`.
_PROBES = r"""
import ctypes, mmap, os, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# int 0x80 with eax, ebx, ecx, edx = the four arguments (push rbx; ...; pop rbx; ret)
code = bytes.fromhex("5389f889f34189d189ca4489c9cd805bc3")
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
i386 = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_int] * 4)(
    ctypes.addressof(ctypes.c_char.from_buffer(page)))
def x64(nr, *args):
    ctypes.set_errno(0)
    res = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return -ctypes.get_errno() if res < 0 else res
def probe(call):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        mine = os.getpid()
        res = call()
        if res == 0 and os.getpid() != mine:  # a clone that worked: this is its child
            os._exit(0)
        os.write(w, struct.pack("q", res))
        os._exit(0)
    os.close(w)
    res = struct.unpack("q", os.read(r, 8))[0]
    os.close(r)
    os.waitpid(pid, 0)
    return "ok" if res >= 0 else -res
NEWUSER, SIGCHLD = 0x10000000, 17
def clone64():
    res = x64(56, NEWUSER | SIGCHLD, 0, 0, 0, 0)
    if res > 0:
        os.waitpid(res, 0)
    return res
def clone32():
    res = i386(120, NEWUSER | SIGCHLD, 0, 0)
    if res > 0:
        os.waitpid(res, 0)
    return res
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter is x86_64 only")
def test_guest_root_cannot_create_user_namespaces(backend: EmulatorBackend, g: MachineRef) -> None:
    out = py(
        backend,
        g,
        _PROBES
        + """
print(probe(lambda: x64(272, NEWUSER)))  # unshare(CLONE_NEWUSER)
print(probe(lambda: x64(272, NEWUSER | 0x00020000)))  # with CLONE_NEWNS
print(probe(clone64))
print(probe(lambda: x64(435, 0, 88)))  # clone3: ENOSYS, so libc falls back to clone
print(probe(lambda: i386(310, NEWUSER, 0, 0)))
print(probe(clone32))
print(probe(lambda: i386(435, 0, 88, 0)))
print(probe(lambda: x64(0x40000000 | 272, NEWUSER)))  # x32
""",
    )
    assert out.split() == ["1", "1", "1", "38", "1", "1", "38", "1"], out
    r = sh(backend, g, "unshare -Urmn true")
    assert r.exit_code != 0 and "Operation not permitted" in r.stderr, r
    # every other way to make a process or thread still works (glibc falls back to clone)
    out = py(
        backend,
        g,
        """
        import os, subprocess, threading
        t = threading.Thread(target=lambda: None); t.start(); t.join()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        print(subprocess.run(["sh", "-c", "echo spawned"], capture_output=True, text=True).stdout)
        """,
    )
    assert out.split() == ["7", "spawned"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter is x86_64 only")
def test_io_uring_is_denied(backend: EmulatorBackend, g: MachineRef) -> None:
    out = py(
        backend,
        g,
        _PROBES
        + """
params = ctypes.create_string_buffer(120)
print(probe(lambda: x64(425, 4, ctypes.addressof(params))))  # io_uring_setup
print(probe(lambda: x64(426, -1, 1, 0, 0, 0, 0)))  # io_uring_enter
print(probe(lambda: x64(427, -1, 0, 0, 0)))  # io_uring_register
print(probe(lambda: i386(425, 4, 0, 0)))
print(probe(lambda: i386(426, -1, 1, 0)))
""",
    )
    assert out.split() == ["1"] * 5, out


# -- 14: a pids limit ----------------------------------------------------------------------
def _limited(backend: EmulatorBackend, ref: MachineRef) -> list[Path]:
    """The guest's limited groups (one per hierarchy, above its leaves), from its meta."""
    meta = json.loads((backend.emu_dir / "guests" / ref.id / "meta.json").read_text())
    groups = meta["groups"]
    return [Path(d) for d in [groups["v2"], *groups["v1"].values()] if d]


def _group_file(backend: EmulatorBackend, ref: MachineRef, name: str) -> str:
    """A file of the guest's limited groups (the first hierarchy that has it), on the host."""
    dirs = _limited(backend, ref)
    for d in dirs:
        if (d / name).exists():
            return (d / name).read_text()
    raise AssertionError(f"no {name} in {dirs}")


_FORKS = r"""
import errno, os, sys
started, failure = [], None
for _ in range(int(sys.argv[1])):
    try:
        pid = os.fork()
    except OSError as exc:
        failure = errno.errorcode[exc.errno]
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "30"])
    started.append(pid)
for pid in started:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(len(started), failure)
"""


def test_fork_loop_stops_at_the_pids_limit(
    state: Path, template: Snapshot, session: Session, backend: EmulatorBackend, g: MachineRef
) -> None:
    low = EmulatorBackend(state_dir=state, options={"pids_max": 512})
    try:
        ref = low.clone(template, MachineSpec(name="pids"), session)
        r = low.execute(ref, [PY, "-c", _FORKS, "600"], timeout=60)
        assert r.exit_code == 0, r
        started, failure = r.stdout.split()
        assert failure == "EAGAIN" and 400 < int(started) < 512, r.stdout
        assert low.execute(ref, ["true"]).exit_code == 0  # PID 1 still starts commands
        low.destroy(ref)
    finally:
        low.close()
    assert _group_file(backend, g, "pids.max").strip() == str(cgroups.DEFAULT_PIDS_MAX)
    bad = EmulatorBackend(state_dir=state, options={"pids_max": "lots"})
    try:
        with pytest.raises(ConfigError, match=r"backends\.emulator\] pids_max='lots'"):
            bad.clone(template, MachineSpec(name="bad"), session)
    finally:
        bad.close()


# -- 15: the OOM killer picks a command, never PID 1 ---------------------------------------
_HOGS = (
    "p=; for i in $(seq 24); do "
    "( x=$(head -c 3000000 /dev/zero | tr '\\0' x); sleep 1 ) & p=\"$p $!\"; done; "
    "n=0; for j in $p; do wait $j || n=$((n+1)); done; echo $n"
)


def test_oom_killer_takes_a_command_not_pid1(
    backend: EmulatorBackend, template: Snapshot, session: Session
) -> None:
    """24 small processes of ~4 MB each in a 48 MB guest: PID 1 (a Python, the biggest
    process) must not be the one that goes."""
    ref = backend.clone(template, MachineSpec(name="oom", memory=48 << 20), session)
    try:
        r = backend.execute(ref, ["/bin/sh", "-c", _HOGS], timeout=120)
        assert r.exit_code == 0 and int(r.stdout) > 0, r  # some hogs were killed ...
        assert backend.execute(ref, ["true"], timeout=10).exit_code == 0  # ... PID 1 was not
        pid1, keeper = (Path(f"/proc/{ref.data[k]}/oom_score_adj") for k in ("pid", "keeper"))
        adj = [pid1.read_text().strip(), *ok(backend, ref, "cat /proc/self/oom_score_adj").split()]
        assert adj in (["-1000", "0"], ["0", "1000"]), adj  # 0/1000: no CAP_SYS_RESOURCE
        assert keeper.read_text().strip() == adj[0]  # its death would take PID 1 along
        assert ok(backend, ref, "cat /proc/self/oom_score_adj", user="nobody") == adj[1] + "\n"
        if adj == ["-1000", "0"]:  # commands start with their own score as their floor
            assert sh(backend, ref, "echo -1000 > /proc/self/oom_score_adj").exit_code != 0
    finally:
        backend.destroy(ref)


# -- 16: PID 1's resource limits are not the guest's to change -----------------------------
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter is x86_64 only")
def test_guest_root_cannot_lower_pid1s_limits(
    backend: EmulatorBackend, g: MachineRef, state: Path
) -> None:
    for limit in ("--nofile=4:4", "--cpu=1:1", "--nproc=1:1", "--as=1000000:1000000"):
        r = sh(backend, g, f"prlimit --pid 1 {limit}")
        assert r.exit_code != 0 and "Operation not permitted" in r.stderr, (limit, r)
    assert "NOFILE" in ok(backend, g, "prlimit --pid 1 --nofile")  # reading them is fine
    out = py(backend, g, _PROBES + "print(probe(lambda: i386(340, 1, 7, 4096)))")
    assert out.split() == ["1"], out  # prlimit64(1, NOFILE, new, ...) through int 0x80
    ok(backend, g, "prlimit --nofile=4:4 true")  # the guest's own processes: allowed
    src = state / "after-prlimit"
    src.write_text("still served")
    for _ in range(3):  # PID 1 keeps serving commands and files
        backend.copy_in(g, src, "/root/after")
        assert ok(backend, g, "cat /root/after") == "still served"


# -- 17: the host view hides the host's credentials ----------------------------------------
_CREDENTIALS = r"""
import json, os, sys, uuid
from pathlib import Path
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec
state = Path(sys.argv[1])
b = EmulatorBackend(state_dir=state)
s = Session(id="cred-" + uuid.uuid4().hex[:8], state_dir=state)
tpl = b.build_template(MachineSpec(name="cred"), "cred", s)
ref = b.clone(tpl, MachineSpec(name="cred"), s)
def run(cmd):
    r = b.execute(ref, ["/bin/sh", "-c", cmd], timeout=30)
    return {"code": r.exit_code, "out": r.stdout, "err": r.stderr}
out = {
    "shadow": run("cat /etc/shadow"),
    "gshadow": run("cat /etc/gshadow"),
    "canary": run("grep -rl CANARY /etc /root 2>/dev/null || true"),
    "ssl": run("ls -A /etc/ssl/private; stat -c '%U:%G %a' /etc/ssl/private"),
    "ssh": run("ls /etc/ssh"),
    "login": run("id root && id daemon"),
}
b.destroy(ref)
b.remove_template(tpl)
b.close()
print(json.dumps(out))
"""


def test_host_view_hides_the_hosts_credentials() -> None:
    """Canary shadow files are mounted over the host's in a mount namespace of the test's
    own (the host's stay as they are); canary SSH host keys and a TLS key are planted (and
    removed) in the host's /etc. A guest on that host view must see none of them."""
    tag = uuid.uuid4().hex[:8]
    fake = TEST_ROOT / f"cred-{tag}"
    (fake / "state").mkdir(parents=True)
    hashed = "$6$CANARYsalt$CANARYhash"
    (fake / "shadow").write_text(
        f"root:{hashed}:19000:0:99999:7:::\nlocked:!{hashed}:19000::::::\nnone::19000::::::\n"
        "daemon:*:19000:0:99999:7:::\n"
    )
    (fake / "gshadow").write_text(f"root:{hashed}::\nadm:!CANARY::alice\n")
    planted = [
        Path(f"/etc/ssh/ssh_host_vmenv{tag}_key"),
        Path(f"/etc/ssh/ssh_host_vmenv{tag}_key.pub"),
        Path(f"/etc/ssl/private/vmenv-{tag}.key"),
    ]
    binds = [("shadow", "/etc/shadow"), ("gshadow", "/etc/gshadow"), ("shadow", "/etc/shadow-")]
    mounts = " && ".join(f"mount --bind {fake / src} {dst}" for src, dst in binds)
    (fake / "run.py").write_text(_CREDENTIALS)
    try:
        for path in planted:
            if path.parent.is_dir():
                path.write_text("CANARY key\n" if path.suffix != ".pub" else "ssh-ed25519 AAAA\n")
                os.chmod(path, 0o600 if path.suffix != ".pub" else 0o644)
        res = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'{mounts} && exec "$0" "$@"', sys.executable, str(fake / "run.py"),
             str(fake / "state")],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
        shutil.rmtree(fake, ignore_errors=True)
    assert out["shadow"]["out"] == (
        "root:*:19000:0:99999:7:::\nlocked:!:19000::::::\nnone:*:19000::::::\n"
        "daemon:*:19000:0:99999:7:::\n"
    ), out["shadow"]
    assert out["gshadow"]["out"] == "root:*::\nadm:!::alice\n", out["gshadow"]
    assert out["canary"]["out"] == "", out["canary"]  # no canary left anywhere in /etc
    if Path("/etc/ssl/private").is_dir():  # empty, with the host's owner and mode
        st = Path("/etc/ssl/private").stat()
        want = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
        assert out["ssl"]["out"].split() == [want, f"{stat.S_IMODE(st.st_mode):o}"], out
    if Path("/etc/ssh").is_dir():  # the private key is gone, the public one stays
        assert f"ssh_host_vmenv{tag}_key.pub" in out["ssh"]["out"].split(), out["ssh"]
        assert f"ssh_host_vmenv{tag}_key" not in out["ssh"]["out"].split(), out["ssh"]
    assert out["login"]["code"] == 0, out["login"]


# -- 18: every pytest-vmenv state dir on the host is hidden --------------------------------
def test_host_view_hides_every_state_dir(
    backend: EmulatorBackend,
    template: Snapshot,
    session: Session,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another live session's state dir (found through the registry it wrote itself into),
    root's default one and ``$XDG_STATE_HOME``'s: all empty in a guest, also in a clone of a
    template built before the other session started."""
    tag = uuid.uuid4().hex[:8]
    registry = TEST_ROOT / f"registry-{tag}"
    registry.mkdir(mode=0o1777)
    os.chmod(registry, 0o1777)
    rootdef, xdg, other = (TEST_ROOT / f"{n}-{tag}" for n in ("rootdef", "xdg", "other"))
    for d in (rootdef, xdg / "pytest-vmenv", other):
        d.mkdir(parents=True)
        (d / "canary").write_text("another session's file")
    monkeypatch.setattr(paths, "REGISTRY", registry, raising=False)
    monkeypatch.setattr(paths, "ROOT_STATE", rootdef, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(xdg))
    passwd = TEST_ROOT / f"passwd-{tag}"
    passwd.write_text(f"root:x:0:0::/root:/bin/sh\nsvc:x:130:130::{other}:/bin/false\n")
    (other / ".local" / "state" / "pytest-vmenv").mkdir(parents=True)
    second = EmulatorBackend(state_dir=other)
    try:
        snap = second.build_template(MachineSpec(name="other"), "other", session)
        live = second.clone(snap, MachineSpec(name="other"), session)
        ref = backend.clone(template, MachineSpec(name="seer"), session)  # built before
        try:
            listed = ok(backend, ref, f"ls -A {rootdef} {xdg}/pytest-vmenv {other}")
            dirs = sorted(f"{d}:" for d in (rootdef, f"{xdg}/pytest-vmenv", other))
            assert listed.split() == dirs, listed
            assert sh(backend, ref, f"test -e {other}/emulator/guests/{live.id}").exit_code == 1
            # found through the registry its first use of its state dir wrote it into
            assert [p.name for p in paths.registered()] == [other.name]
            # and a default state dir under an account's home (if its home is not masked)
            assert f"{str(other)[1:]}/.local/state/pytest-vmenv" in hostmask._state_dirs(passwd)
        finally:
            backend.destroy(ref)
            second.destroy(live)
            second.remove_template(snap)
    finally:
        second.close()
        for d in (registry, rootdef, xdg, other):
            shutil.rmtree(d, ignore_errors=True)
        passwd.unlink()


def test_state_dir_registry_counts_only_what_owners_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone may add to the registry (a sticky dir), so an entry counts only if its file and
    the dir it names are the registering user's (root's entries: any dir); stale ones go."""
    tag = uuid.uuid4().hex[:8]
    registry, mine, theirs = (TEST_ROOT / f"{n}-{tag}" for n in ("reg", "mine", "theirs"))
    registry.mkdir(mode=0o1777)
    os.chmod(registry, 0o1777)
    for d in (mine, theirs):
        d.mkdir()
    os.chown(mine, 1234, 1234)
    monkeypatch.setattr(paths, "REGISTRY", registry)

    def entry(name: str, text: str, uid: int) -> None:
        (registry / name).write_text(text + "\n")
        os.chown(registry / name, uid, uid)

    try:
        entry("1234-a", str(mine), 1234)  # counts: their own dir
        entry("1234-b", str(theirs), 1234)  # root's dir, named by another user: ignored
        entry("0-c", str(mine), 1234)  # claims to be root's entry: ignored
        entry("0-d", str(TEST_ROOT / f"gone-{tag}"), 0)  # stale: removed
        os.symlink(registry / "1234-a", registry / "1234-e")  # a link: ignored
        assert paths.registered() == [mine]
        assert not (registry / "0-d").exists()
        paths.register(theirs)  # root registers: counts, and only once
        paths.register(theirs)
        assert sorted(paths.registered()) == sorted([mine, theirs])
        assert len(list(registry.iterdir())) == 5
        os.chmod(registry, 0o777)  # no longer sticky: not trusted at all
        assert paths.registered() == []
    finally:
        for d in (registry, mine, theirs):
            shutil.rmtree(d)


# -- 19: PID 1 never follows a guest's link to its own /proc files -------------------------
def test_guest_links_to_pid1s_proc_files_reach_nothing_of_the_host(
    state: Path, template: Snapshot, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File requests are served by PID 1, whose ``/proc/self`` is itself: a guest's symlink
    to ``/proc/self/environ`` or ``/proc/self/fd/1`` must not hand a test's read-modify-write
    pytest's environment, nor let a copy overwrite the host file PID 1 logs to."""
    secret = f"CANARY{uuid.uuid4().hex}"
    monkeypatch.setenv("VMENV_TEST_CI_TOKEN", secret)  # before this backend's zygote starts
    b = EmulatorBackend(state_dir=state)
    ref = b.clone(template, MachineSpec(name="links"), session)
    try:
        for link, target in (
            ("env.conf", "/proc/self/environ"),
            ("log.conf", "/proc/self/fd/1"),
            ("err.conf", "/proc/1/fd/2"),
            ("exe.conf", "/proc/self/exe"),
            ("cwd", "/proc/self/cwd"),
        ):
            ok(b, ref, f"ln -s {target} /etc/{link}")
        got = state / "links-got"
        try:
            b.copy_out(ref, "/etc/env.conf", got)
            assert secret not in got.read_text(errors="replace")
        except BackendError:
            pass  # refusing the link is fine too
        log = b.emu_dir / "guests" / ref.id / "boot.log"
        before = log.read_bytes()
        src = state / "links-src"
        src.write_text("overwritten\n")
        for path in ("/etc/log.conf", "/etc/err.conf", "/etc/exe.conf", "/etc/cwd/etc/x"):
            with pytest.raises(BackendError):
                b.copy_in(ref, src, path)
        for path in ("/etc/log.conf", "/etc/exe.conf"):
            with pytest.raises(BackendError):
                b.copy_out(ref, path, got)
        assert log.read_bytes()[: len(before)] == before  # the host's file is untouched
        # what a guest path names inside the guest still works, symlinks included
        ok(b, ref, "mkdir /srv/real && ln -s /srv/real /srv/link && ln -s ../srv/real/f /srv/rel")
        b.copy_in(ref, src, "/srv/link/f")
        assert ok(b, ref, "cat /srv/real/f") == "overwritten\n"
        b.copy_out(ref, "/srv/rel", got)
        assert got.read_text() == "overwritten\n"
        assert ok(b, ref, "echo fine") == "fine\n"
    finally:
        b.destroy(ref)
        b.close()


@pytest.mark.parametrize("how", ["openat2", "walk"])
def test_guest_paths_resolve_like_the_guest_means_them(how: str) -> None:
    """PID 1's resolver (:mod:`.resolve`), with ``openat2`` and with the component walk used
    where the kernel lacks it, run here on the host's root: symlinks of every kind work,
    links into /proc and loops are refused."""
    from pytest_vmenv.emulator.guest import resolve

    if how == "openat2" and not resolve._have_openat2():
        pytest.skip("this kernel has no openat2")
    opener = resolve.open_in_root if how == "openat2" else resolve._walk
    tree = TEST_ROOT / f"resolve-{uuid.uuid4().hex[:8]}"
    (tree / "real").mkdir(parents=True)
    (tree / "real" / "f").write_text("found")
    links = {
        "abs": f"{tree}/real",
        "rel": "real/f",
        "up": f"../{tree.name}/real/f",
        "chain": "abs/f",
        "fd": "/proc/self/fd/0",
        "exe": "/proc/self/exe",
        "loop1": "loop2",
        "loop2": "loop1",
    }
    for name, target in links.items():
        os.symlink(target, tree / name)
    try:
        paths = [f"{tree}/{p}" for p in ("real/f", "abs/f", "rel", "up", "chain", "abs/../real/f")]
        for path in [*paths, f"/../..{tree}/rel"]:  # ".." at the root stays there
            with os.fdopen(opener(path, 0)) as f:
                assert f.read() == "found", path
        for path in ("fd", "exe", "loop1"):
            with pytest.raises(OSError) as info:
                os.close(opener(f"{tree}/{path}", 0))
            assert info.value.errno == errno.ELOOP, path
        fd = opener(f"{tree}/abs/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        assert stat.S_IMODE((tree / "real" / "new").stat().st_mode) == 0o600
        with pytest.raises(FileNotFoundError):
            opener(f"{tree}/missing/x", 0)
    finally:
        shutil.rmtree(tree)


# -- 20: cgroups: a group of the guest's own everywhere, limits above it, nested ones go ----
# Guest root cannot mount a cgroupfs (no CAP_SYS_ADMIN, no user namespace, see 13), but an
# init that mounts one for itself (systemd) or a kernel bug could give it one. The intruder
# below is guest root with CAP_SYS_ADMIN over its own namespaces, which is what a user
# namespace gave it: it joins PID 1's cgroups, cgroup and mount namespaces, mounts every
# hierarchy in a private mount namespace (in the guest's /tmp) and runs the test's actions.
# It prints their results as JSON, then runs the "after" actions once a line comes on stdin.
_INTRUDER = r"""
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid1, req = int(sys.argv[1]), json.loads(sys.argv[2])

def check(res, what):
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(src, dst, fstype, flags=0, data=""):
    check(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() or None), f"mount {fstype} {dst}")

for procs in req["join"]:  # PID 1's groups, in every hierarchy
    with open(procs, "w") as f:
        f.write("0")
for ns, flag in (("cgroup", 0x02000000), ("mnt", 0x00020000)):
    fd = os.open(f"/proc/{pid1}/ns/{ns}", os.O_RDONLY)
    check(libc.setns(fd, flag), f"setns {ns}")
    os.close(fd)
os.chdir("/")
check(libc.unshare(0x00020000), "unshare")
mount("none", "/", None, (1 << 18) | 16384)
mount("tmpfs", "/tmp", "tmpfs", 0, "size=64k,mode=700")
for i, name in enumerate(req["hierarchies"]):
    os.mkdir(f"/tmp/h{i}")
    if name:
        mount("cgroup", f"/tmp/h{i}", "cgroup", 0, ("none," + name) if "=" in name else name)
    else:
        mount("cgroup2", f"/tmp/h{i}", "cgroup2")

def act(op, i=0, rel="", value=""):
    path = f"/tmp/h{i}/{rel}".rstrip("/")
    try:
        if op == "write":
            with open(path, "w") as f:
                f.write(value)
        elif op == "read":
            with open(path) as f:
                return f.read().strip()
        elif op == "ls":
            return sorted(os.listdir(path))
        elif op == "mkdir":
            os.mkdir(path)
        elif op == "rmdir":
            os.rmdir(path)
        elif op == "chain":  # int(value) nested groups of 200-character names: past PATH_MAX
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            for _ in range(int(value)):
                os.mkdir("x" * 200, dir_fd=fd)
                below = os.open("x" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = below
            os.close(fd)
        elif op == "copy":  # value: the file at the mount's root to copy into rel
            with open(f"/tmp/h{i}/{value}") as src, open(path, "w") as dst:
                dst.write(src.read())
        elif op == "alloc":  # a child holding int(value) bytes; its wait status
            pid = os.fork()
            if pid == 0:
                hog = b"x" * int(value)
                os._exit(0 if len(hog) else 1)
            return os.waitpid(pid, 0)[1]
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

print(json.dumps([act(*a) for a in req["actions"]]), flush=True)
sys.stdin.readline()
for a in req.get("after", []):
    act(*a)
"""


@dataclass(frozen=True)
class Mounted:
    """A cgroup hierarchy this test process is in (``name`` "" is v2), and its mount."""

    name: str
    mount: Path
    own: str

    def controls(self, ctrl: str) -> bool:
        return ctrl in self.name.split(",")

    @property
    def own_dir(self) -> Path:
        return self.mount / self.own.lstrip("/")


def _hierarchies() -> list[Mounted]:
    """Read here, not with the code under test: /proc/self/cgroup and the cgroup mounts."""
    own = dict(ln.split(":", 2)[1:] for ln in Path("/proc/self/cgroup").read_text().splitlines())
    found: dict[str, Mounted] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _src, opts = right.split()[:3]
        root, mnt = left.split()[3:5]
        if fstype not in ("cgroup", "cgroup2") or root != "/":
            continue
        for name, path in own.items():
            v1 = fstype == "cgroup" and name and set(name.split(",")) <= set(opts.split(","))
            if name not in found and (v1 or (fstype == "cgroup2" and name == "")):
                found[name] = Mounted(name, Path(mnt), path)
    return sorted(found.values(), key=lambda h: h.name)


def _join_files(pid: int) -> list[str]:
    """The host paths of the ``cgroup.procs`` of every group process ``pid`` is in."""
    mounts = {h.name: h.mount for h in _hierarchies()}
    files = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hid, name, path = line.split(":", 2)
        if name in mounts:
            files.append(str(mounts[name] / path.lstrip("/") / "cgroup.procs"))
    return files


class Intruder:
    """Runs :data:`_INTRUDER` against a guest's PID 1 (see above); always ends it."""

    def __init__(self, pid1: int, actions: list[list[object]], after: Any = ()) -> None:
        self.names = [h.name for h in _hierarchies()]
        req = {"join": _join_files(pid1), "hierarchies": self.names, "actions": actions}
        req["after"] = list(after)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _INTRUDER, str(pid1), json.dumps(req)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = bounded(self.proc.stdout.readline, 60)
        if not line:
            _out, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"the intruder failed: {err}")
        self.results: list[Any] = json.loads(str(line))

    def groups(self) -> list[str]:
        """Where the intruder is now, in every hierarchy, as the host sees it."""
        return [
            ln.split(":", 2)[2]
            for ln in Path(f"/proc/{self.proc.pid}/cgroup").read_text().splitlines()
        ]

    def finish(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def _canary(tag: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Path]]]:
    """A host process (``sleep``) in groups ``vmenv-canary-TAG/canary`` at the root of the
    freezer, cpuset and devices hierarchies: what a guest must not be able to touch."""
    made: dict[str, Path] = {}
    proc = subprocess.Popen(["sleep", "300"])
    try:
        for ctrl in ("freezer", "cpuset", "devices"):
            h = next((h for h in _hierarchies() if h.controls(ctrl)), None)
            if h is None:
                continue
            group = h.mount / f"vmenv-canary-{tag}" / "canary"
            group.mkdir(parents=True)
            made[ctrl] = group
            if ctrl == "cpuset":
                for d in (group.parent, group):
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        (d / name).write_text((d.parent / name).read_text())
            (group / "cgroup.procs").write_text(str(proc.pid))
        yield proc, made
    finally:
        if "freezer" in made:
            (made["freezer"] / "freezer.state").write_text("THAWED")
        proc.kill()
        proc.wait()
        for group in made.values():
            _scrub(group.parent)


def _rmdir_retrying(d: Path) -> None:
    for _ in range(2000):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.005)
    d.rmdir()


def test_guest_is_in_a_group_of_its_own_in_every_hierarchy(
    backend: EmulatorBackend, g: MachineRef
) -> None:
    """In every hierarchy (each v1 one: freezer, cpuset, devices, name=systemd, ...; and
    v2) the guest's cgroup namespace is rooted at a leaf of its own: a cgroupfs mounted from
    inside shows nothing of the host's groups. A canary host process's freezer, cpuset and
    devices groups cannot be written, the host's root ``cgroup.procs`` (leaving the guest's
    group) cannot be reached, and a group made at the guest's root lands in its own tree."""
    leaf = f"/pytest-vmenv/{g.id}/guest"
    pid1 = int(g.data["pid"])
    mine = [ln.split(":", 2)[1] for ln in Path("/proc/self/cgroup").read_text().splitlines()]
    seen = dict(
        ln.split(":", 2)[1:] for ln in Path(f"/proc/{pid1}/cgroup").read_text().splitlines()
    )
    mounted = {h.name for h in _hierarchies()}
    assert {n: p for n, p in seen.items() if n in mounted and not p.endswith(leaf)} == {}
    assert mounted <= set(mine) and mounted == {n for n in seen if n in mounted}
    # what guest root itself sees: "/" everywhere, no cgroupfs, and none it can mount
    assert {ln.split(":", 2)[2] for ln in ok(backend, g, "cat /proc/self/cgroup").split()} == {"/"}
    assert ok(backend, g, "ls -A /sys/fs/cgroup") == ""
    assert sh(backend, g, "mkdir /sys/fs/cgroup/x").exit_code != 0
    r = sh(backend, g, "mkdir -p /mnt/cg && mount -t cgroup2 none /mnt/cg")
    assert r.exit_code != 0 and "ermission denied" in r.stderr + r.stdout, r

    tag = uuid.uuid4().hex[:8]
    planted = f"vmenv-planted-{tag}"
    with _canary(tag) as (canary, groups):
        before = {c: (d / f).read_text() for c, d, f in (
            ("freezer", groups.get("freezer"), "freezer.state"),
            ("cpuset", groups.get("cpuset"), "cpuset.cpus"),
            ("devices", groups.get("devices"), "devices.list"),
        ) if d is not None}  # fmt: skip
        rel = f"vmenv-canary-{tag}/canary"
        names = [h.name for h in _hierarchies()]
        attacks: list[list[object]] = []
        for ctrl, file, value in (
            ("freezer", "freezer.state", "FROZEN"),
            ("cpuset", "cpuset.cpus", "0"),
            ("devices", "devices.deny", "a"),
        ):
            i = next((i for i, n in enumerate(names) if ctrl in n.split(",")), None)
            if i is not None:
                attacks.append(["write", i, f"{rel}/{file}", value])
        plants = [["mkdir", i, planted] for i in range(len(names))]
        escapes = [["write", i, "cgroup.procs", "0"] for i in range(len(names))]
        intruder = Intruder(
            pid1,
            attacks + plants + escapes,
            after=[["rmdir", i, planted] for i in range(len(names))],
        )
        try:
            results = intruder.results
            assert results[: len(attacks)] == ["ENOENT"] * len(attacks), (attacks, results)
            for c, text in before.items():
                file = {"freezer": "freezer.state", "cpuset": "cpuset.cpus"}.get(c, "devices.list")
                assert (groups[c] / file).read_text() == text, c
            assert Path(f"/proc/{canary.pid}/stat").read_text().rpartition(")")[2].split()[0] == "S"
            host = [(h.mount / planted, h.own_dir / planted) for h in _hierarchies()]
            assert [p for pair in host for p in pair if p.exists()] == []
            assert [p for p in intruder.groups() if not p.endswith(leaf)] == []
        finally:
            intruder.finish()
            for h in _hierarchies():
                _scrub(h.mount / planted)


def test_guest_root_cannot_lift_its_limits(
    backend: EmulatorBackend, template: Snapshot, session: Session
) -> None:
    """With a cgroupfs mounted (see the intruder), guest root writes "no limit" into every
    limit file at its namespace's root: the limits sit one level above it, so they hold
    (300 MB do not fit in ``memory="128M"``) and the host's files keep their values."""
    spec = MachineSpec(name="limits", memory=128 << 20, cpus=1)
    ref = backend.clone(template, spec, session)
    try:
        limits = {
            "memory.limit_in_bytes": "-1", "memory.max": "max", "cpu.cfs_quota_us": "-1",
            "cpu.max": "max", "pids.max": "max",
        }  # fmt: skip
        count = len(_hierarchies())
        lifts: list[list[object]] = [
            ["write", i, f, v] for i in range(count) for f, v in limits.items()
        ]  # at the root of every mount (ENOENT where a hierarchy has no such file)
        before = {f: _group_file(backend, ref, f) for f in limits if _has_file(backend, ref, f)}
        intruder = Intruder(int(ref.data["pid"]), [*lifts, ["alloc", 0, "", str(300 << 20)]])
        try:
            *written, status = intruder.results
            assert "memory.limit_in_bytes" in before or "memory.max" in before, before
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, (status, written)
            assert {f: _group_file(backend, ref, f) for f in before} == before
        finally:
            intruder.finish()
        r = sh(backend, ref, "head -c 300M /dev/zero | tail > /dev/null", timeout=60)
        assert r.exit_code == 137, r  # and the guest itself is still bounded
    finally:
        backend.destroy(ref)


def _has_file(backend: EmulatorBackend, ref: MachineRef, name: str) -> bool:
    return any((d / name).exists() for d in _limited(backend, ref))


_CREATOR = r"""
import json, sys, time
from pathlib import Path
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec
state = Path(sys.argv[1])
b = EmulatorBackend(state_dir=state)
s = Session(id="nested", state_dir=state)
ref = b.clone(b.build_template(MachineSpec(), "nested", s), MachineSpec(name="nested"), s)
print(json.dumps({"id": ref.id, "pid": ref.data["pid"]}), flush=True)
time.sleep(300)
"""


def _nest(pid1: int, name: str) -> Intruder:
    """Groups ``NAME/b`` made at the guest's root in every hierarchy, with a process in them
    (the intruder itself, which then waits), and a chain of groups below ``NAME`` whose path
    is longer than PATH_MAX."""
    actions: list[list[object]] = []
    for i, h in enumerate(_hierarchies()):
        actions += [["mkdir", i, name], ["mkdir", i, f"{name}/b"], ["chain", i, name, "24"]]
        if h.controls("cpuset"):  # a v1 cpuset group needs cpus and memory nodes to join
            for file in ("cpuset.cpus", "cpuset.mems"):
                actions += [
                    ["copy", i, f"{name}/{file}", file],
                    ["copy", i, f"{name}/b/{file}", file],
                ]
        actions.append(["write", i, f"{name}/b/cgroup.procs", "0"])
    intruder = Intruder(pid1, actions)
    assert intruder.results == ["ok"] * len(actions), intruder.results
    return intruder


def _scrub(group: Path) -> None:
    """Test cleanup whatever the code under test did: kill what is in ``group`` and below,
    remove it deepest first (through directory fds: chains may be deeper than PATH_MAX)."""
    try:
        fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        _scrub_at(fd)
    finally:
        os.close(fd)
    _rmdir_retrying(group)


def _scrub_at(fd: int) -> None:
    for entry in list(os.scandir(fd)):
        if entry.is_dir(follow_symlinks=False):
            sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                _scrub_at(sub)
            finally:
                os.close(sub)
            for _ in range(2000):
                try:
                    os.rmdir(entry.name, dir_fd=fd)
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    time.sleep(0.005)
    with open(os.open("cgroup.procs", os.O_RDONLY, dir_fd=fd)) as f:
        for pid in f.read().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


def test_groups_a_guest_made_do_not_block_teardown(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    """A guest with groups of its own below its root (and a process in them) is destroyed
    by ``destroy``, and by ``vmenv gc --all`` once its creator was killed: the nested
    groups go first, deepest first, instead of EBUSY on every try."""
    name = f"vmenv-nest-{uuid.uuid4().hex[:8]}"
    roots = [d / name for h in _hierarchies() for d in (h.mount, h.own_dir)]
    ref = backend.clone(template, MachineSpec(name="nested"), session)
    dirs = _limited(backend, ref)
    intruder = None
    try:
        intruder = _nest(int(ref.data["pid"]), name)
        bounded(lambda: backend.destroy(ref), 30)
        assert intruder.proc.wait(timeout=10) == -9
        assert [d for d in dirs if d.exists()] == []
    finally:
        if intruder is not None:
            intruder.finish()
        for d in [*roots, *dirs]:  # a failed run's leftovers, not the code's cleanup
            _scrub(d)
        with contextlib.suppress(BackendError):
            backend.destroy(ref)

    other = state / f"nested-{uuid.uuid4().hex[:8]}"
    other.mkdir()
    env = dict(os.environ, VMENV_STATE_DIR=str(other))
    creator = subprocess.Popen(
        [sys.executable, "-c", _CREATOR, str(other)], stdout=subprocess.PIPE, text=True, env=env
    )
    intruder, dirs = None, []
    try:
        assert creator.stdout is not None
        made = json.loads(str(bounded(creator.stdout.readline, 120)))
        gdir = other / "emulator" / "guests" / made["id"]
        meta = json.loads((gdir / "meta.json").read_text())
        dirs = [Path(d) for d in [meta["groups"]["v2"], *meta["groups"]["v1"].values()] if d]
        intruder = _nest(int(made["pid"]), name)
        creator.kill()
        creator.wait()
        gc = [sys.executable, "-m", "pytest_vmenv", "gc", "--all"]
        for _ in range(2):  # the second finds nothing left
            res = subprocess.run(gc, capture_output=True, text=True, env=env, timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
            assert "error" not in res.stdout + res.stderr, res.stdout + res.stderr
        assert intruder.proc.wait(timeout=10) == -9
        assert not gdir.exists() and [d for d in dirs if d.exists()] == []
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()
        if intruder is not None:
            intruder.finish()
        for d in [*roots, *dirs]:
            _scrub(d)
        leftover = EmulatorBackend(state_dir=other)
        for r in leftover.owned():
            with contextlib.suppress(Exception):
                leftover.destroy(r)
        leftover.close()
        shutil.rmtree(other, ignore_errors=True)


# A pure cgroup2 host, as far as the delegation logic goes: a private mount of this host's
# cgroup2 hierarchy (in a mount namespace of its own, so nothing is mounted on the host) and
# a test-owned subtree in it, given to the code as the hierarchy it runs in.
_PURE_V2 = r"""
import ctypes, errno, json, os, sys, time
from pathlib import Path
from pytest_vmenv.emulator.host.cgroups import DEFAULT_GROUPS_MAX, Cgroups, Hierarchy
libc = ctypes.CDLL(None, use_errno=True)

def check(res, what):
    if res != 0:
        raise OSError(ctypes.get_errno(), what)

def write(path, value):
    with open(path, "w") as f:
        f.write(value)

work, tag = Path(sys.argv[1]), sys.argv[2]
mnt = work / "cg2"
mnt.mkdir()
check(libc.mount(b"cgroup2", str(mnt).encode(), b"cgroup2", 0, None), "mount")
orig = next(ln for ln in open("/proc/self/cgroup") if ln.startswith("0::")).split(":", 2)[2].strip()
top = mnt / f"vmenv-v2-{tag}"
(top / "pytest").mkdir(parents=True)
for ctrl in (top / "cgroup.controllers").read_text().split():
    if ctrl in ("memory", "cpu", "pids"):  # keep guests' groups inside this subtree
        write(top / "cgroup.subtree_control", f"+{ctrl}")
write(top / "pytest" / "cgroup.procs", "0")  # this process plays pytest
out = {}
try:
    cg = Cgroups([Hierarchy("", mnt, f"/{top.name}/pytest")], rootless=False)
    groups, out["problems"] = cg.create("g1", 128 << 20, 1, 64)
    limited = groups.v2
    out["limited"] = str(limited.relative_to(top))
    files = ("cgroup.max.descendants", "memory.max", "cpu.max", "pids.max")
    out["before"] = {f: (limited / f).read_text() for f in files if (limited / f).exists()}
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the guest: in its leaf, its own cgroup namespace, cgroup2 mounted inside
        res = {}
        for procs in groups.procs_files():
            write(procs, "0")
        check(libc.unshare(0x02000000 | 0x00020000), "unshare")
        inner = work / "inner"
        check(libc.mount(b"cgroup2", str(inner).encode(), b"cgroup2", 0, None), "mount inner")
        res["cgroup"] = open("/proc/self/cgroup").read()
        res["own_max"] = (inner / "cgroup.max.descendants").read_text().strip()
        for f in files:
            try:
                write(inner / f, "max")
                res[f] = "ok"
            except OSError as exc:
                res[f] = errno.errorcode[exc.errno]
        made = 0
        for k in range(DEFAULT_GROUPS_MAX + 50):
            try:
                os.mkdir(inner / f"c{k}")
                made += 1
            except OSError as exc:
                res["mkdir"] = errno.errorcode[exc.errno]
                break
        res["made"] = made
        write(inner / "cgroup.procs", "0")  # "out" to the root of its view: its own leaf
        res["dirs"] = sorted(p.name for p in inner.iterdir() if p.is_dir())[:3]
        os.write(w, json.dumps(res).encode())
        os.read(go_r, 1)
        os._exit(0)
    os.close(w)
    out["guest"] = json.loads(os.read(r, 1 << 20))
    out["guest_at"] = open(f"/proc/{pid}/cgroup").read().strip()
    os.write(go_w, b"x")
    os.waitpid(pid, 0)
    out["after"] = {f: (limited / f).read_text() for f in out["before"]}
    start = time.monotonic()
    groups.remove(timeout=30)
    out["remove_s"] = time.monotonic() - start
    out["left"] = limited.exists()
finally:
    write(mnt / orig.lstrip("/") / "cgroup.procs", "0")
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    top.rmdir()
print(json.dumps(out))
"""


def test_pure_v2_guest_writes_only_inside_its_own_subtree(state: Path) -> None:
    """On cgroup2 alone (the logic a pure-v2 host runs): the guest's namespace root is a leaf
    below its limited group. From inside, with cgroup2 mounted, guest root sees and writes
    only its own subtree: "max" written into every limit file of its root changes nothing
    of the limits (its group count stays bounded by the parent's ``cgroup.max.descendants``)
    and writing its root's ``cgroup.procs`` keeps it in its leaf. Teardown removes the
    thousand groups it made, deepest first."""
    work = state / f"v2-{uuid.uuid4().hex[:8]}"
    (work / "inner").mkdir(parents=True)
    try:
        res = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _PURE_V2,
             str(work), uuid.uuid4().hex[:8]],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    guest = out["guest"]
    assert out["limited"] in ("pytest-vmenv/g1", "pytest/pytest-vmenv/g1"), out
    assert out["before"]["cgroup.max.descendants"] == f"{cgroups.DEFAULT_GROUPS_MAX + 1}\n"
    for ctrl, value in (("memory.max", "134217728\n"), ("pids.max", "64\n")):
        if ctrl in out["before"]:  # where the host's cgroup2 has the controller
            assert out["before"][ctrl] == value, out
    unavailable = [p for p in out["problems"] if "no usable cgroup" not in p]
    assert unavailable == [], out["problems"]
    assert "0::/" in guest["cgroup"].splitlines() and guest["own_max"] == "max", guest
    assert guest["cgroup.max.descendants"] == "ok", guest  # its own root's: harmless
    assert (guest["made"], guest["mkdir"]) == (cgroups.DEFAULT_GROUPS_MAX, "EAGAIN"), guest
    assert out["after"] == out["before"], out
    v2_at = next(ln for ln in out["guest_at"].splitlines() if ln.startswith("0::"))
    assert v2_at.endswith(f"/{out['limited']}/{cgroups.LEAF}"), out
    assert out["left"] is False and out["remove_s"] < 10, out


# -- 21: the unprivileged mode: delegated cgroups where the user has some, else RLIMIT_NPROC -
def _unprivileged_helpers() -> Any:
    """The area and runner helpers of test_unprivileged.py (test files are no package)."""
    name = "_vmenv_unprivileged_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("test_unprivileged.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


_NOBODY_LIMITS = r"""
import json, sys, warnings
from pathlib import Path
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec
rootfs, state = sys.argv[1], Path(sys.argv[2])
b = EmulatorBackend(state_dir=state, options={"pids_max": 512})
spec = MachineSpec(name="u", image=rootfs, image_config={"rootfs": rootfs}, memory=128 << 20)
s = Session(id="unpriv-limits", state_dir=state)
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tpl = b.build_template(spec, "unpriv-limits", s)
    ref = b.clone(tpl, spec, s)
out["warnings"] = sorted({str(w.message) for w in caught})
def run(cmd):
    r = b.execute(ref, ["/bin/sh", "-c", cmd], timeout=120)
    return [r.exit_code, r.stdout, r.stderr]
try:
    meta = json.loads((b.emu_dir / "guests" / ref.id / "meta.json").read_text())
    out["id"], out["groups"] = ref.id, meta["groups"]
    with open(f"/proc/{ref.data['pid']}/cgroup") as f:
        out["pid1"] = f.read().splitlines()
    out["limits"] = run("grep -i 'max processes' /proc/self/limits")
    out["hog"] = run("dd if=/dev/zero of=/dev/null bs=300M count=1")
    out["forks"] = run("i=0; while [ $i -lt 600 ]; do sleep 30 & i=$((i+1)); echo $i; done")
finally:
    b.destroy(ref)
    b.remove_template(tpl)
    b.close()
print(json.dumps(out))
"""


@contextlib.contextmanager
def _delegated_to_nobody(tag: str, nobody: int) -> Iterator[list[str]]:
    """Groups ``vmenv-deleg-TAG`` below this process's own in the v2 hierarchy and the v1
    memory, cpu and pids ones, owned by ``nobody`` as a delegating administrator (or
    systemd's ``Delegate=yes``) leaves them; yields their ``cgroup.procs`` to join."""
    made = []
    try:
        for h in _hierarchies():
            if h.name and not any(h.controls(c) for c in ("memory", "cpu", "pids")):
                continue
            group = h.own_dir / f"vmenv-deleg-{tag}"
            group.mkdir()
            made.append(group)
            for name in ("", "cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads"):
                if (group / name).exists():
                    os.chown(group / name, nobody, nobody)
        yield [str(g / "cgroup.procs") for g in made]
    finally:
        for group in made:
            _scrub(group)


def test_unprivileged_guests_use_delegated_cgroups_else_rlimit_nproc() -> None:
    """As nobody, without a delegated cgroup: RLIMIT_NPROC (``pids_max``) is set in the
    guest's user namespace, so a fork loop stops at it, and the memory limit is warned
    about. In a delegated cgroup (v1 memory/cpu/pids and v2 groups owned by nobody): the
    guest gets its own groups there, in a leaf below the limited group, and 300 MB do not
    fit in ``memory="128M"``."""
    u = _unprivileged_helpers()
    if not u._static_busybox():
        pytest.skip(f"{u.BUSYBOX} is not a static busybox (needed for the test rootfs)")
    u.AREA_ROOT.mkdir(mode=0o755, exist_ok=True)
    root = u.AREA_ROOT / uuid.uuid4().hex[:12]
    root.mkdir(mode=0o755)
    area = u.Area(root, root / "rootfs", root / "state", root / "home")
    for d in (area.state, area.home):
        d.mkdir(mode=0o700)
    u._make_rootfs(area.rootfs)
    os.symlink("busybox", area.rootfs / "bin" / "dd")
    u._chown_tree(root)
    u._python_for_nobody(area)
    runner = u.Runner(area)
    before = u._procs_of_nobody()
    try:
        probe = runner.run(
            [
                "python",
                "-c",
                "from pytest_vmenv.emulator.host import userns; print(userns.probe())",
            ],
            60,
        )
        if probe.stdout.strip() != "None":
            pytest.skip(f"the unprivileged mode is unavailable to nobody here: {probe.stdout}")

        def as_nobody(join: list[str]) -> dict[str, Any]:
            argv = [area.python, "-c", _NOBODY_LIMITS, str(area.rootfs), str(area.state)]
            proc = subprocess.Popen(
                ["sh", "-c", 'for f in $JOIN; do echo $$ > "$f" || exit 99; done; exec "$@"',
                 "sh", *u._setpriv(argv)],
                cwd=area.root, env={**runner.env(), "JOIN": " ".join(join)},
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, start_new_session=True,
            )  # fmt: skip
            runner.roots.add(proc.pid)
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
            return dict(json.loads(out.strip().splitlines()[-1]))

        plain = as_nobody([])
        tag = uuid.uuid4().hex[:8]
        with _delegated_to_nobody(tag, u.NOBODY) as join:
            deleg = as_nobody(join)
    finally:
        left = u._leftovers(before, runner.roots)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        u._assert_no_mounts(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes of nobody left behind: {left}"

    code, out, err = plain["forks"]
    assert code != 0 and "can't fork" in err, plain["forks"]
    assert 400 < int(out.split()[-1]) < 512, plain["forks"]  # PID 1 and the keeper count too
    assert plain["limits"][1].split()[2:4] == ["512", "512"], plain["limits"]
    assert plain["hog"][0] == 0, plain["hog"]  # no delegated memory controller: warned about
    warned = [w for w in plain["warnings"] if "the memory and cpus limits are not applied" in w]
    assert warned and "without a delegated cgroup" in warned[0], plain["warnings"]
    assert plain["groups"] == {"v2": None, "v1": {}}, plain["groups"]

    leaf = f"/vmenv-deleg-{tag}/pytest-vmenv/{deleg['id']}/{cgroups.LEAF}"
    at = {ln.split(":")[1]: ln.split(":", 2)[2] for ln in deleg["pid1"]}  # PID 1's groups
    assert at["memory"].endswith(leaf) and at[""].endswith(leaf), at
    assert deleg["hog"][0] == 137, deleg["hog"]  # SIGKILLed by the OOM killer
    assert not any("not applied" in w for w in deleg["warnings"]), deleg["warnings"]
    code, out, err = deleg["forks"]
    assert code != 0 and int(out.split()[-1]) < 512, deleg["forks"]
