"""What a guest's output, disk and console may cost the host: bounded, and by how much.

Real guests as root (state under /var/lib/pytest-vmenv-test/). Each test names what it
proves; sizes stay small (at most a few hundred MiB of output, read and thrown away, and a
few tens of MiB written to disk) and everything is removed afterwards.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_vmenv import backend as core
from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef, Result, Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.errors import CommandTimeout
from pytest_vmenv.machine import Machine
from pytest_vmenv.spec import MachineSpec

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's real-namespace tests need Linux and root",
)

MiB = 1024 * 1024


@pytest.fixture
def vm(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> Iterator[Machine]:
    spec = MachineSpec(name="bounds")
    ref = backend.clone(template, spec, session)
    yield Machine(backend, ref, spec, scratch=state / "scratch")
    backend.destroy(ref)


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_growth(call: Callable[[], object]) -> tuple[int, object]:
    """How far pytest's resident memory peaked above where it was while ``call`` ran."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    try:
        value: object = call()
    except Exception as exc:  # noqa: BLE001 - measured, then handed back
        value = exc
    return _status("VmHWM") - before, value


def gdir(state: Path, ref: MachineRef) -> Path:
    return state / "emulator" / "guests" / ref.id


def host_bytes(path: Path) -> int:
    """Disk space the host pays for the tree at ``path`` (not crossing into mounts)."""
    dev = path.stat().st_dev
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(root, d)).st_dev == dev]
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


# -- output: what run() holds ------------------------------------------------------------
def test_run_keeps_at_most_max_output_per_stream_in_memory(vm: Machine) -> None:
    growth, result = peak_growth(lambda: vm.run("head -c 128M /dev/zero; echo done >&2"))
    assert isinstance(result, Result), result
    assert growth < 80 * MiB, f"pytest grew by {growth / MiB:.0f} MiB for 128 MiB of output"
    assert len(result.stdout_bytes) == core.OUTPUT_LIMIT == 16 * MiB
    assert result.stdout_dropped == 128 * MiB - core.OUTPUT_LIMIT
    assert result.truncated and result.exit_code == 0
    assert (result.stderr, result.stderr_dropped) == ("done\n", 0)
    assert not vm.run("echo small").truncated


def test_max_output_is_a_keyword_of_run_and_truncation_is_logged(
    vm: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pytest_vmenv"):
        r = vm.run("head -c 3000000 /dev/zero; printf err >&2", max_output=MiB)
    assert (len(r.stdout_bytes), r.stdout_dropped) == (MiB, 3_000_000 - MiB)
    assert (r.stderr_bytes, r.stderr_dropped, r.truncated) == (b"err", 0, True)
    assert "max_output=1048576" in caplog.text and "get()" in caplog.text
    assert vm.succeed("printf abc", max_output=2) == "ab"


def test_timeout_bounds_a_flooding_command_in_time_and_memory(vm: Machine) -> None:
    start = time.monotonic()
    growth, result = peak_growth(lambda: vm.run("head -c 768M /dev/zero; sleep 60", timeout=2))
    assert isinstance(result, CommandTimeout), result
    assert time.monotonic() - start < 8
    assert growth < 80 * MiB, f"pytest grew by {growth / MiB:.0f} MiB before the timeout"
    assert vm.run("true").exit_code == 0


_DRAIN = r"""
import os, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from pytest_vmenv.emulator import wire
from pytest_vmenv.emulator.host import streams
mine, guest = wire.socketpair()
wire.send(guest, {"pid": 2})
wire.send(guest, {"exit": 0})
never_empty = os.open("/dev/zero", os.O_RDONLY)  # output that keeps coming after the exit
err_r, err_w = os.pipe()
os.close(err_w)
in_r, in_w = os.pipe()
start = time.monotonic()
code, out, err = streams.communicate(mine, in_w, never_empty, err_r, None, 2.0)
print(code, out.kept, round(time.monotonic() - start, 1))
"""


def test_output_after_the_exit_is_drained_within_bounds() -> None:
    """A pipe that never runs dry (a daemon keeps writing) must not hold ``run`` forever."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRAIN], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, kept, seconds = proc.stdout.split()
    assert code == "0" and int(kept) <= 2 * MiB and float(seconds) < 3


# -- disk= ----------------------------------------------------------------------------------
def test_disk_limit_makes_writes_fail_with_enospc_and_bounds_the_host(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    spec = MachineSpec(name="small", disk=32 * MiB)
    ref = backend.clone(template, spec, session)
    vm = Machine(backend, ref, spec, scratch=state / "scratch")
    try:
        r = vm.run("dd if=/dev/zero of=/var/tmp/fill bs=1M count=64")
        assert r.exit_code != 0 and "No space left on device" in r.stderr, r
        assert host_bytes(gdir(state, ref)) < 40 * MiB
        vm.succeed("rm /var/tmp/fill && echo ok > /var/tmp/again")  # space comes back
        total = int(vm.succeed("df -k / | tail -1").split()[1]) * 1024
        assert 24 * MiB < total <= 32 * MiB
    finally:
        backend.destroy(ref)
    assert str(state) not in Path("/proc/self/mountinfo").read_text()
    small = backend.unavailable_for(MachineSpec(name="tiny", disk=4096))
    assert small is not None and "too small" in small


def test_disk_limit_holds_through_provision_snapshot_and_revert(
    backend: EmulatorBackend, session: Session, state: Path
) -> None:
    spec = MachineSpec(
        name="prov", disk=32 * MiB, provision=("head -c 4M /dev/urandom > /opt/blob",)
    )
    snap = backend.build_template(spec, f"disk-prov-{session.id}", session)
    ref = backend.clone(snap, spec, session)
    vm = Machine(backend, ref, spec, scratch=state / "scratch")
    try:
        assert vm.succeed("wc -c < /opt/blob").strip() == str(4 * MiB)
        vm.write_text("/var/tmp/state", "before")
        mine = vm.snapshot("before")
        vm.write_text("/var/tmp/state", "after")
        vm.revert(mine)
        assert vm.read_text("/var/tmp/state") == "before"
        r = vm.run("dd if=/dev/zero of=/var/tmp/fill bs=1M count=64")
        assert "No space left on device" in r.stderr, r
    finally:
        backend.destroy(ref)
        backend.remove_template(snap)
    assert str(state) not in Path("/proc/self/mountinfo").read_text()


# -- the console log ------------------------------------------------------------------------
def test_console_log_is_capped_and_keeps_the_newest_output(vm: Machine, state: Path) -> None:
    cap = 4 * MiB  # console.CONSOLE_LIMIT, as the README documents it
    vm.succeed(
        f"exec 3>>/dev/console; head -c {3 * cap} /dev/zero | tr '\\0' x >&3; "
        "echo the-last-line >&3"
    )
    deadline = time.monotonic() + 10
    while "the-last-line" not in vm.console_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = [p for p in gdir(state, vm.ref).iterdir() if p.name.startswith("console.log")]
    assert sum(p.stat().st_size for p in logs) <= 2 * cap + 4096
    text = vm.console_log()
    assert text.rstrip().endswith("the-last-line")
    assert "console log rotated" in text
    from pytest_vmenv.emulator.guest.console import CONSOLE_LIMIT

    assert cap == CONSOLE_LIMIT


# -- get ----------------------------------------------------------------------------------
def test_get_keeps_sparse_files_sparse(vm: Machine, tmp_path: Path) -> None:
    vm.succeed(
        "truncate -s 150M /var/tmp/sparse && printf middle | dd of=/var/tmp/sparse bs=1 "
        "seek=78643200 conv=notrunc 2>/dev/null && printf end >> /var/tmp/sparse"
    )
    out = tmp_path / "sparse"
    vm.get("/var/tmp/sparse", out)
    st = out.stat()
    assert st.st_size == 150 * MiB + 3
    assert st.st_blocks * 512 < MiB, f"{st.st_blocks * 512} bytes written for a sparse file"
    with open(out, "rb") as f:
        f.seek(78643200)
        assert f.read(6) == b"middle"
        f.seek(-3, os.SEEK_END)
        assert f.read() == b"end"
        f.seek(1000)
        assert f.read(4) == bytes(4)
    vm.succeed("truncate -s 5M /var/tmp/hole")  # a file that is all hole
    vm.get("/var/tmp/hole", out)
    assert (out.stat().st_size, out.stat().st_blocks) == (5 * MiB, 0)
    assert vm.read_text("/proc/self/status").startswith("Name:")  # pseudo-files: size 0
    assert vm.read_text("/sys/kernel/mm/transparent_hugepage/enabled").count("\n") == 1


def test_get_refuses_files_over_max_size(vm: Machine, tmp_path: Path) -> None:
    vm.succeed("head -c 2M /dev/urandom > /var/tmp/two")
    out = tmp_path / "two"
    with pytest.raises(errors.FileTooLarge, match="max_size=1048576") as info:
        vm.get("/var/tmp/two", out, max_size=MiB)
    assert (info.value.size, info.value.max_size) == (2 * MiB, MiB)
    assert not out.exists()
    vm.get("/var/tmp/two", out, max_size=2 * MiB)
    assert out.stat().st_size == 2 * MiB
    vm.succeed(f"truncate -s {core.GET_LIMIT + 1} /var/tmp/huge")  # sparse: costs nothing
    with pytest.raises(errors.FileTooLarge, match="max_size=None"):
        vm.get("/var/tmp/huge", tmp_path / "huge")
    with pytest.raises(errors.FileTooLarge):
        vm.read_bytes("/var/tmp/two", max_size=10)
    vm.get("/var/tmp/huge", tmp_path / "huge", max_size=None)
    assert (tmp_path / "huge").stat().st_size == core.GET_LIMIT + 1


def test_a_failed_get_leaves_an_existing_local_file_as_it_was(vm: Machine, tmp_path: Path) -> None:
    vm.succeed("head -c 2M /dev/urandom > /var/tmp/two")
    out = tmp_path / "kept"
    out.write_bytes(b"the test's own data")
    with pytest.raises(errors.FileTooLarge):
        vm.get("/var/tmp/two", out, max_size=MiB)
    assert out.read_bytes() == b"the test's own data"
    with pytest.raises(errors.BackendError):
        vm.get("/var/tmp/no-such-file", out)
    assert out.read_bytes() == b"the test's own data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_get_of_a_file_that_grows_past_max_size_is_stopped(vm: Machine, tmp_path: Path) -> None:
    """The guest appends while copies run: whether a copy sees it up front or on the way,
    it stops at ``max_size`` and leaves no new file behind."""
    vm.succeed("head -c 40M /dev/zero | tr '\\0' x > /var/tmp/grow")
    vm.run("(for i in $(seq 40); do head -c 1M /dev/urandom >> /var/tmp/grow; done) >/dev/null &")
    out = tmp_path / "grow"
    with pytest.raises(errors.FileTooLarge):
        for _ in range(400):
            vm.get("/var/tmp/grow", out, max_size=48 * MiB)
            out.unlink()
    assert not out.exists()


def _frames(*extents: tuple[int, bytes]) -> bytes:
    from pytest_vmenv.emulator.wire import FRAME

    return b"".join(FRAME.pack(off, len(data)) + data for off, data in extents)


def test_extent_stream_is_written_with_holes_and_checked(tmp_path: Path) -> None:
    from pytest_vmenv.emulator.host.faults import TooLarge
    from pytest_vmenv.emulator.host.transfer import Extents as _Extents

    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        sink = _Extents(fd, 64 * MiB)
        stream = _frames((0, b"head"), (32 * MiB, b"tail"))
        for i in range(0, len(stream), 7):  # headers split across reads
            sink.feed(stream[i : i + 7])
        sink.finish(48 * MiB)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 48 * MiB
    assert (data[:4], data[32 * MiB : 32 * MiB + 4]) == (b"head", b"tail")
    assert path.stat().st_blocks * 512 < MiB
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(TooLarge):
            _Extents(null, 100).feed(_frames((90, b"x" * 20)))
        with pytest.raises(OSError) as info:
            _Extents(null, None).feed(_frames((50, b"a"), (10, b"b")))
        assert info.value.errno == errno.EPROTO
    finally:
        os.close(null)
