"""Nothing leaks: real pytest processes killed with real signals, then the host inspected.

Each case starts an inner pytest session in the background, waits until it holds machines
(or is building, cloning, tearing down), kills it, and proves that within 15 s no guest
process, mount, cgroup, ledger entry or scratch dir of that session is left, and that
`vmenv gc` finds nothing more.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.paths import state_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator's host image needs root")

# The inner session tells the outer test its session id, then what it holds.
CONFTEST = """
import json, os, time, pytest
from pytest_vmenv.plugin import plugin_key

@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        with open(os.environ["VMENV_TEST_OUT"] + ".session", "w") as f:
            f.write(config.stash[plugin_key].session_id)

def pytest_vmenv_template_built(spec, snapshot, seconds):
    open(os.environ["VMENV_TEST_OUT"] + ".template", "w").close()

def report(**data):
    with open(os.environ["VMENV_TEST_OUT"], "a") as f:
        f.write(json.dumps(data) + "\\n")
"""


class Inner:
    """An inner pytest session run in the background."""

    def __init__(self, path: Path, source: str, *args: str, conftest: str = "") -> None:
        self.path = path
        self.token = secrets.randbelow(10**6) + 10**6
        path.mkdir(parents=True, exist_ok=True)
        (path / "conftest.py").write_text(CONFTEST + textwrap.dedent(conftest))
        source = textwrap.dedent(source).replace("TOKEN", str(self.token))
        (path / "test_inner.py").write_text(source)
        self.out = path / "out.jsonl"
        env = {**os.environ, "VMENV_TEST_OUT": str(self.out)}
        self.log = open(path / "pytest.log", "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", *args],
            cwd=path, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def session(self) -> str:
        wait_for(lambda: Path(str(self.out) + ".session").exists(), "the session id")
        return Path(str(self.out) + ".session").read_text()

    def records(self) -> list[dict[str, object]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def output(self) -> str:
        return (self.path / "pytest.log").read_text(errors="replace")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def guests_of(session: str) -> list[str]:
    backend = EmulatorBackend()
    return [ref.id for ref in backend.owned(session)]


def leftovers(session: str, token: int, guest_ids: list[str]) -> list[str]:
    """Everything of ``session`` still on the host."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(token).encode() in cmdline:
            found.append(f"process {pid}: {cmdline.decode(errors='replace')}")
    mounts = Path("/proc/self/mountinfo").read_text() + Path("/proc/1/mountinfo").read_text()
    for gid in guest_ids:
        if gid in mounts:
            found.append(f"mount of guest {gid}")
        for path in glob.glob(f"/sys/fs/cgroup/**/pytest-vmenv/{gid}", recursive=True):
            found.append(f"cgroup {path}")
    found += [f"guest dir {gid}" for gid in guests_of(session)]
    if (state_dir() / "ledger" / session).exists():
        found.append(f"ledger of {session}")
    found += [f"scratch dir {p.name}" for p in (state_dir() / "scratch").glob(f"{session}-*")]
    return found


def assert_clean(session: str, token: int, guest_ids: list[str], within: float = 15) -> None:
    deadline = time.monotonic() + within
    while (left := leftovers(session, token, guest_ids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind after {within:g}s: {left}"
    gc = subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", "gc"], capture_output=True, text=True, check=True
    )
    assert session not in gc.stdout, gc.stdout


@pytest.fixture
def inner_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "inner"


HOLD_TWO = """
import time, pytest
from conftest import report

@pytest.mark.vm(name="a", image="host")
@pytest.mark.vm(name="b", image="host")
def test_hold(vms):
    for m in vms.values():
        m.succeed("setsid sleep TOKEN < /dev/null > /dev/null 2>&1 &")
    report(ids=[m.ref.id for m in vms.values()])
    time.sleep(120)
"""


def _guest_ids(inner: Inner) -> list[str]:
    ids: list[str] = []
    for record in inner.records():
        ids += record.get("ids", [])  # type: ignore[arg-type]
    return ids


def test_sigkill_while_a_test_holds_two_machines(inner_dir: Path) -> None:
    inner = Inner(inner_dir, HOLD_TWO)
    wait_for(inner.records, "the machines")
    session, ids = inner.session, _guest_ids(inner)
    assert len(leftovers(session, inner.token, ids)) >= 2  # the daemons run
    inner.proc.kill()
    inner.wait()
    assert_clean(session, inner.token, ids)


def watchdog_of(pid: int) -> int:
    """The pid of the watchdog process that pytest process ``pid`` started."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pytest_vmenv.reaper" in argv and any(f":{pid}:".encode() in a for a in argv):
            return int(entry)
    raise AssertionError(f"no watchdog of pytest process {pid}")


def test_sigkill_of_pytest_and_its_watchdog_is_swept_by_the_next_session(
    inner_dir: Path,
) -> None:
    """Nothing cleaned up at once (the watchdog died too, as in an OOM kill of the whole
    group): the next session's sweep removes the machines, the ledger and the scratch dir."""
    inner = Inner(inner_dir, HOLD_TWO)
    wait_for(inner.records, "the machines")
    session, ids = inner.session, _guest_ids(inner)
    scratch = state_dir() / "scratch"
    assert [p.name for p in scratch.glob(f"{session}-*")] == [f"{session}-master"]
    os.kill(watchdog_of(inner.proc.pid), signal.SIGKILL)
    inner.proc.kill()
    inner.wait()
    time.sleep(1)
    assert list(scratch.glob(f"{session}-*")), "nothing may have swept yet"
    nxt = Inner(
        inner_dir.parent / "next",
        "import pytest\n@pytest.mark.vm(image='host')\ndef test_t(vm): pass\n",
    )
    assert nxt.wait() == 0, nxt.output()
    assert f"removed scratch dir {session}-master" in nxt.output(), nxt.output()
    assert_clean(session, inner.token, ids)


def test_sigkill_during_template_build(inner_dir: Path) -> None:
    inner = Inner(
        inner_dir,
        """
        import pytest
        @pytest.mark.vm(image="host", provision=["setsid sleep TOKEN </dev/null >/dev/null 2>&1 &",
                                                 "sleep 120"])
        def test_x(vm):
            pass
        """,
    )
    session = inner.session
    wait_for(lambda: guests_of(session), "the template builder")
    ids = guests_of(session)
    time.sleep(0.3)
    inner.proc.kill()
    inner.wait()
    assert_clean(session, inner.token, ids)


def test_sigkill_during_clone(inner_dir: Path) -> None:
    inner = Inner(
        inner_dir,
        """
        import pytest
        DAEMON = "setsid sleep TOKEN </dev/null >/dev/null 2>&1 &"
        @pytest.mark.vm(image="host", ready=DAEMON + " sleep 120")
        def test_x(vm):
            pass
        """,
    )
    session = inner.session
    wait_for(lambda: Path(str(inner.out) + ".template").exists(), "the template")
    wait_for(lambda: guests_of(session), "the clone")
    ids = guests_of(session)
    time.sleep(0.3)
    inner.proc.kill()
    inner.wait()
    assert_clean(session, inner.token, ids)


def test_sigkill_during_teardown(inner_dir: Path) -> None:
    inner = Inner(
        inner_dir,
        """
        import pytest
        from conftest import report

        @pytest.mark.vm(name="a", image="host")
        @pytest.mark.vm(name="b", image="host")
        def test_hold(vms):
            for m in vms.values():
                m.succeed("setsid sleep TOKEN < /dev/null > /dev/null 2>&1 &")
            report(ids=[m.ref.id for m in vms.values()])
        """,
        conftest="""
        @pytest.hookimpl(tryfirst=True)
        def pytest_vmenv_make_backend(name, cls, options, config):
            backend = cls(options)  # the real backend; destroy stalls after its first machine
            real = backend.destroy
            def destroy(ref):
                real(ref)
                report(destroyed=ref.id)
                time.sleep(120)
            backend.destroy = destroy
            return backend
        """,
    )
    wait_for(lambda: any("destroyed" in r for r in inner.records()), "the first destroy")
    session, ids = inner.session, _guest_ids(inner)
    assert len(leftovers(session, inner.token, ids)) >= 1  # the second machine still runs
    inner.proc.kill()
    inner.wait()
    assert_clean(session, inner.token, ids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_a_test_tears_down_in_order(inner_dir: Path, signum: int) -> None:
    inner = Inner(inner_dir, HOLD_TWO)
    wait_for(inner.records, "the machines")
    session, ids = inner.session, _guest_ids(inner)
    inner.proc.send_signal(signum)
    code = inner.wait()
    assert code == pytest.ExitCode.INTERRUPTED, inner.output()
    # teardown ran in pytest itself: nothing to wait for
    assert leftovers(session, inner.token, ids) == [], inner.output()


def test_second_signal_exits_at_once_and_watchdog_sweeps(inner_dir: Path) -> None:
    inner = Inner(
        inner_dir,
        """
        import time, pytest
        from conftest import report

        @pytest.fixture
        def slow_cleanup(vm):
            yield vm
            time.sleep(120)  # a teardown that hangs: the second signal must not wait for it

        @pytest.mark.vm(image="host")
        def test_hold(slow_cleanup):
            slow_cleanup.succeed("setsid sleep TOKEN < /dev/null > /dev/null 2>&1 &")
            report(ids=[slow_cleanup.ref.id])
            time.sleep(120)
        """,
    )
    wait_for(inner.records, "the machine")
    session, ids = inner.session, _guest_ids(inner)
    inner.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    inner.proc.send_signal(signal.SIGTERM)
    assert inner.wait(10) == 128 + signal.SIGTERM
    assert_clean(session, inner.token, ids)


def test_two_sessions_one_killed_other_untouched(tmp_path: Path) -> None:
    survivor = Inner(
        tmp_path / "survivor",
        """
        import os, time, pytest
        from conftest import report

        @pytest.mark.vm(image="host", name="keep")
        def test_long(vm):
            pid = vm.succeed("setsid sleep TOKEN < /dev/null > /dev/null 2>&1 & echo $!").strip()
            report(ids=[vm.ref.id])
            while not os.path.exists(os.environ["VMENV_TEST_OUT"] + ".go"):
                time.sleep(0.05)
            # the other session died and was swept meanwhile: this machine still works
            vm.succeed(f"kill -0 {pid}")
            vm.succeed("echo still here")

        @pytest.mark.vm(image="host")
        def test_after(vm):
            vm.succeed("true")
        """,
    )
    victim = Inner(tmp_path / "victim", HOLD_TWO)
    wait_for(survivor.records, "the survivor's machine")
    wait_for(victim.records, "the victim's machines")
    session, ids = victim.session, _guest_ids(victim)
    victim.proc.kill()
    victim.wait()
    assert_clean(session, victim.token, ids)
    # a third session starting now sweeps at start too: it must not touch the survivor
    third = Inner(
        tmp_path / "third", "import pytest\n@pytest.mark.vm(image='host')\ndef test_t(vm): pass\n"
    )
    assert third.wait() == 0, third.output()
    assert (state_dir() / "scratch" / f"{survivor.session}-master").is_dir()
    Path(str(survivor.out) + ".go").touch()
    assert survivor.wait() == 0, survivor.output()


def test_xdist_worker_crash_is_reaped(inner_dir: Path) -> None:
    inner = Inner(
        inner_dir,
        """
        import os, pytest
        from conftest import report

        @pytest.mark.vm(image="host")
        @pytest.mark.parametrize("n", range(4))
        def test_ok(vm, n):
            vm.succeed("true")

        @pytest.mark.vm(image="host")
        def test_crash(vm):
            vm.succeed("setsid sleep TOKEN < /dev/null > /dev/null 2>&1 &")
            report(ids=[vm.ref.id])
            os._exit(1)
        """,
        "-n",
        "2",
    )
    code = inner.wait(120)
    output = inner.output()
    assert code == pytest.ExitCode.TESTS_FAILED, output
    assert "4 passed" in output and "1 failed" in output, output
    assert_clean(inner.session, inner.token, _guest_ids(inner))
