"""Crash-proof teardown of emulator guests, proven with real processes and real signals.

What is proven: guests carry their owner's labels; ``destroy`` works from any
process, on guests whose creator was SIGKILLed, half-created ones, and ones whose PID 1 or
zygote was killed; ``keep`` makes a guest outlive its creator and stay usable from other
processes; ``shell`` gives a real pty; a dead zygote is restarted. Runs as root on Linux;
state lives under /var/lib/pytest-vmenv-test/, never /tmp.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_vmenv.backend import Session, Snapshot, owner_alive, owner_token, process_start
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.emulator.host.cgroups import Cgroups
from pytest_vmenv.errors import BackendError, MachineGone
from pytest_vmenv.spec import MachineSpec

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's real-namespace tests need Linux and root",
)

TEST_ROOT = Path("/var/lib/pytest-vmenv-test")
REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

# A creator process: N guests, each running a setsid daemon, optionally kept; prints what it
# made as one JSON line, then either waits to be killed or exits cleanly ("exit").
CREATOR = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from pytest_vmenv.emulator import EmulatorBackend
    from pytest_vmenv.backend import Session
    from pytest_vmenv.spec import MachineSpec
    state, sid, count, keep, mode = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), \\
        sys.argv[4] == "keep", sys.argv[5]
    b = EmulatorBackend(state_dir=state)
    s = Session(id=sid, state_dir=state)
    snap = b.build_template(MachineSpec(provision=("echo t > /etc/t",)), "k-" + sid, s)
    refs = []
    for i in range(count):
        ref = b.clone(snap, MachineSpec(name=f"m{i}"), s)
        b.execute(ref, ["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 </dev/null &"])
        if keep:
            b.keep(ref)
        refs.append(ref.id)
    print(json.dumps({"ids": refs, "zygote": b.zygote_pid, "owner": s.owner}), flush=True)
    if mode == "exit":
        b.close()
        sys.exit(0)
    time.sleep(1000)
""")


@pytest.fixture
def state() -> Iterator[Path]:
    path = TEST_ROOT / f"teardown-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    leftover = EmulatorBackend(state_dir=path)
    for ref in leftover.owned():  # never leave a guest behind, even if a test failed
        leftover.destroy(ref)
    leftover.close()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend(state: Path) -> Iterator[EmulatorBackend]:
    b = EmulatorBackend(state_dir=state)
    b.check()
    yield b
    b.close()


@pytest.fixture
def session(state: Path) -> Session:
    return Session(id=f"s-{uuid.uuid4().hex[:8]}", state_dir=state)


@pytest.fixture
def template(backend: EmulatorBackend, session: Session) -> Snapshot:
    return backend.build_template(MachineSpec(name="vm"), "plain", session)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def meta_of(state: Path, gid: str) -> dict[str, object]:
    data = json.loads((state / "emulator" / "guests" / gid / "meta.json").read_text())
    assert isinstance(data, dict)
    return data


def zombie(pid: int) -> bool:
    """An exited process its parent has not reaped yet: it runs nothing any more."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def procs_of(meta: dict[str, object]) -> set[int]:
    """Every process in the guest's cgroups, plus PID 1 and keeper if they still exist."""
    found: set[int] = set()
    for d in meta["cgroups"]:  # type: ignore[attr-defined]
        with contextlib.suppress(FileNotFoundError):
            found.update(int(x) for x in (Path(d) / "cgroup.procs").read_text().split())
    for key in ("pid", "keeper"):
        pid = int(meta[key])  # type: ignore[call-overload]
        if pid and process_start(pid) == meta.get(f"{key}_start") and not zombie(pid):
            found.add(pid)
    return found


def guest_mounts(state: Path) -> list[str]:
    return [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(state) in line
    ]


def start_creator(
    state: Path, sid: str, count: int, keep: bool, mode: str = "wait"
) -> tuple[subprocess.Popen[str], dict[str, object]]:
    argv = [
        sys.executable,
        "-c",
        CREATOR,
        str(state),
        sid,
        str(count),
        "keep" if keep else "-",
        mode,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=ENV, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the creator failed (exit {proc.wait()})"
    return proc, json.loads(line)


def assert_all_gone(state: Path, metas: list[dict[str, object]]) -> None:
    for meta in metas:
        assert not (state / "emulator" / "guests" / str(meta["id"])).exists()
        assert procs_of(meta) == set()
        for d in meta["cgroups"]:  # type: ignore[attr-defined]
            assert not Path(d).exists(), d
        for key in ("pid", "keeper"):  # not even a zombie: someone reaped them
            pid, start = int(meta[key]), meta.get(f"{key}_start")  # type: ignore[call-overload]
            reaped = functools.partial(lambda p, s: process_start(p) != s, pid, start)
            wait_for(reaped, 5, f"{key} {pid} to be reaped")
    assert guest_mounts(state) == []


# -- 1. labels -------------------------------------------------------------------------------
def test_guests_and_templates_carry_owner_labels(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    before = time.time()
    ref = backend.clone(template, MachineSpec(name="lab"), session)
    assert (ref.owner, ref.kept, ref.data["state"]) == (session.owner, False, "running")
    assert meta_of(state, ref.id)["owner"] == session.owner
    assert "owner_pid" not in meta_of(state, ref.id)
    (listed,) = [r for r in backend.owned(session.id) if r.id == ref.id]
    assert listed.owner == session.owner and owner_alive(listed.owner)
    assert before - 1 <= listed.created <= time.time()
    assert (listed.kept, listed.data["state"], listed.data["pid"]) == (
        False,
        "running",
        ref.data["pid"],
    )
    (tpl,) = [t for t in backend.templates() if t.handle == template.handle]
    assert (tpl.session, tpl.owner, tpl.complete) == (
        session.id,
        session.owner,
        True,
    )
    assert before - 1 <= tpl.created <= time.time()
    snap = backend.snapshot(ref, "labelled")
    assert {t.handle: t.owner for t in backend.templates()}[snap.handle] == session.owner
    backend.destroy(ref)
    assert snap.handle not in {t.handle for t in backend.templates()}  # its snapshot went too
    # remove_template works from any process, on what templates() lists
    code = "from pytest_vmenv.emulator import EmulatorBackend as B; from pathlib import Path; "
    code += f"b = B(state_dir=Path({str(state)!r})); [b.remove_template(t) for t in b.templates()]"
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
    assert backend.templates() == [] and not Path(template.handle).exists()


# -- 2. destroy from anywhere ----------------------------------------------------------------
def test_destroy_of_a_half_created_guest(backend: EmulatorBackend, state: Path) -> None:
    gid = uuid.uuid4().hex[:16]
    gdir = state / "emulator" / "guests" / gid
    gdir.mkdir(parents=True)
    groups, _problems = Cgroups().create(gid, None, None)
    victim = subprocess.Popen(["sleep", "1000"])  # stands in for a keeper that joined its groups
    for procs in groups.procs_files():
        Path(procs).write_text(str(victim.pid))
    meta = {
        "id": gid,
        "name": "half",
        "session": "half-s",
        "owner": owner_token(),
        "pid": 0,
        "keeper": 0,
        "created": time.time(),
        "stack": [],
        "snapshots": [],
        "cgroups": [str(d) for d in groups.dirs],
        "groups": groups.to_json(),
    }
    (gdir / "meta.json").write_text(json.dumps(meta))
    (ref,) = EmulatorBackend(state_dir=state).owned("half-s")
    assert ref.data["state"] == "creating"
    backend.destroy(ref)
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert not gdir.exists() and not any(d.exists() for d in groups.dirs)
    backend.destroy(ref)  # idempotent
    (gdir / "upper").mkdir(parents=True)  # a dir without meta at all
    backend.destroy(ref)
    assert not gdir.exists()


def test_sigkilled_creator_leaves_nothing_running_and_gc_removes_the_rest(state: Path) -> None:
    sid = f"dead-{uuid.uuid4().hex[:6]}"
    proc, made = start_creator(state, sid, count=2, keep=False)
    ids = [str(i) for i in made["ids"]]  # type: ignore[attr-defined]
    metas = [meta_of(state, gid) for gid in ids]
    assert all(procs_of(m) for m in metas), "each guest runs PID 1 and a daemon"
    zygote = int(made["zygote"])  # type: ignore[call-overload]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(procs_of(m) for m in metas), 5, "the guests' processes to die")
    wait_for(lambda: not Path(f"/proc/{zygote}").exists(), 5, "the zygote to exit")
    assert guest_mounts(state) == []
    for meta in metas:
        for d in meta["cgroups"]:  # type: ignore[attr-defined]
            assert (Path(d) / "cgroup.procs").read_text().split() == []
    sweeper = EmulatorBackend(state_dir=state)
    found = {r.id: r for r in sweeper.owned(sid)}
    assert set(found) == set(ids)
    assert all(r.data["state"] == "gone" and not owner_alive(r.owner) for r in found.values())
    for ref in found.values():
        sweeper.destroy(ref)
        sweeper.destroy(ref)
    assert list(sweeper.owned(sid)) == []
    assert_all_gone(state, metas)
    sweeper.close()


# -- 3. keep ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_kept_guest_outlives_its_creator_until_destroyed(state: Path, how: str) -> None:
    sid = f"kept-{uuid.uuid4().hex[:6]}"
    proc, made = start_creator(
        state, sid, count=1, keep=True, mode="exit" if how == "exit" else "wait"
    )
    (gid,) = [str(i) for i in made["ids"]]  # type: ignore[attr-defined]
    zygote = int(made["zygote"])  # type: ignore[call-overload]
    if how == "sigkill":
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) in (0, -signal.SIGKILL)
    meta = meta_of(state, gid)
    assert meta["kept"] is True
    time.sleep(0.3)  # give a wrongly-dying guest the time to die
    other = EmulatorBackend(state_dir=state)
    (ref,) = other.owned(sid)
    assert (ref.kept, ref.data["state"]) == (True, "kept")
    out = other.execute(ref, ["sh", "-c", "cat /etc/t; cat /proc/[0-9]*/comm | grep -c '^sleep$'"])
    assert out.stdout.split() == ["t", "1"], out
    src = state / "in.txt"
    src.write_text("payload\n")
    other.copy_in(ref, src, "/root/in.txt")
    other.copy_out(ref, "/root/in.txt", state / "out.txt")
    assert (state / "out.txt").read_text() == "payload\n"
    with pytest.raises(BackendError, match="only the process that created"):
        other.snapshot(ref, "nope")
    other.keep(ref)  # already kept: a no-op
    other.close()  # closing a backend that only attached must not destroy the guest
    assert procs_of(meta)
    gc = EmulatorBackend(state_dir=state)
    gc.destroy(ref)
    assert_all_gone(state, [meta])
    wait_for(
        lambda: not Path(f"/proc/{zygote}").exists(),
        5,
        "the zygote to exit after its last kept guest",
    )
    with pytest.raises(MachineGone):
        gc.execute(ref, ["true"])
    gc.close()


def test_ctl_socket_is_private(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    ref = backend.clone(template, MachineSpec(name="priv"), session)
    sock = state / "emulator" / "guests" / ref.id / "ctl.sock"
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
    r = backend.execute(ref, ["sh", "-c", f"ls {sock.parent} || test -e {sock}"])
    assert r.exit_code != 0  # the guest cannot see its own dir, let alone the socket
    backend.destroy(ref)


# -- 4. shell --------------------------------------------------------------------------------
SHELL_CLIENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pytest_vmenv.emulator import EmulatorBackend
    b = EmulatorBackend(state_dir=Path(sys.argv[1]))
    (ref,) = [r for r in b.owned() if r.id == sys.argv[2]]
    argv = sys.argv[3:] or None
    sys.exit(b.shell(ref, argv))
""")


def run_in_pty(argv: list[str], typed: bytes, timeout: float = 20) -> tuple[int, bytes]:
    """Run ``argv`` on a fresh pty, type ``typed``, return (exit code, everything it printed)."""
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(argv[0], argv, ENV)
    out = bytearray()
    os.write(master, typed)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                chunk = b""
            out += chunk
            if not chunk:  # the child closed the pty: it is exiting
                deadline = min(deadline, time.monotonic() + 5)
                time.sleep(0.01)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os.close(master)
            return os.waitstatus_to_exitcode(status), bytes(out)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(master)
    raise AssertionError(f"the shell did not finish; it printed {bytes(out)!r}")


def test_shell_is_a_real_pty_from_another_process(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    ref = backend.clone(template, MachineSpec(name="sh"), session)
    typed = b"tty; stty size; echo $((6*7)); exit 3\n"
    code, out = run_in_pty([sys.executable, "-c", SHELL_CLIENT, str(state), ref.id], typed)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    lines = text.replace("\r", "").splitlines()
    assert code == 3, out
    assert "42" in lines, out
    assert "/dev/pts/0" in lines, out  # the pty is the guest's own
    assert "24 80" in lines, out  # the caller's pty has no size: the default is passed
    code, out = run_in_pty(
        [sys.executable, "-c", SHELL_CLIENT, str(state), ref.id, "sh", "-c", "exit 7"], b""
    )
    assert code == 7, out
    assert backend.execute(ref, ["true"]).exit_code == 0  # the guest is untouched
    backend.destroy(ref)


# -- 5. fault tolerance ----------------------------------------------------------------------
def test_dead_zygote_is_restarted_and_its_guests_are_gone(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    a = backend.clone(template, MachineSpec(name="a"), session)
    meta = meta_of(state, a.id)
    first = backend.zygote_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not procs_of(meta), 5, "the zygote's guests to die with it")
    with pytest.raises(MachineGone, match=r"'a'.*destroy\(\) removes"):
        backend.execute(a, ["true"])
    b = backend.clone(template, MachineSpec(name="b"), session)
    assert backend.zygote_pid not in (None, first)
    assert backend.execute(b, ["echo", "ok"]).stdout == "ok\n"
    again = backend.build_template(MachineSpec(provision=("true",)), "after-restart", session)
    assert Path(again.handle).exists()
    backend.destroy(a)
    backend.destroy(a)
    assert_all_gone(state, [meta])
    backend.destroy(b)


def test_killed_pid1_means_machine_gone(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    ref = backend.clone(template, MachineSpec(name="p1"), session)
    backend.execute(ref, ["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 </dev/null &"])
    meta = meta_of(state, ref.id)
    os.kill(int(ref.data["pid"]), signal.SIGKILL)
    wait_for(lambda: not procs_of(meta), 5, "the guest's processes to die with its PID 1")
    with pytest.raises(MachineGone, match="'p1'"):
        backend.execute(ref, ["true"])
    other = EmulatorBackend(state_dir=state)
    with pytest.raises(MachineGone):
        other.execute(ref, ["true"])
    assert [r.data["state"] for r in other.owned(session.id) if r.id == ref.id] == ["gone"]
    backend.destroy(ref)
    assert_all_gone(state, [meta])
    other.close()


def test_keep_requires_the_creator(
    backend: EmulatorBackend, template: Snapshot, session: Session, state: Path
) -> None:
    ref = backend.clone(template, MachineSpec(name="mine"), session)
    other = EmulatorBackend(state_dir=state)
    with pytest.raises(BackendError, match="only the process that created"):
        other.keep(ref)
    assert other.execute(ref, ["hostname"]).stdout == "mine\n"  # live guests are reachable too
    other.close()
    assert backend.execute(ref, ["true"]).exit_code == 0
    backend.keep(ref)
    assert meta_of(state, ref.id)["kept"] is True
    backend.close()  # kept: survives the close of its own backend
    assert EmulatorBackend(state_dir=state).execute(ref, ["true"]).exit_code == 0
    keeper = int(meta_of(state, ref.id)["keeper"])  # type: ignore[call-overload]
    assert Path(f"/proc/{keeper}").exists()
