"""The channel wrapper's promises, run by the host's ``/bin/sh`` and by busybox ``sh``.

Each channel's configuration (SSH, the libvirt agent, vSphere guest operations) runs real
commands as local processes: exit codes, ``128 + N`` on a signal, 127 for a missing program,
stdin, separate binary output, a background child that does not hold the wrapper, and the
group kill. The busybox runs have only busybox's applets on ``PATH`` and busybox as the
wrapper's shell, as in the libvirt backend's tiny image (no ``setsid -w``, busybox
``mktemp``/``wc``/``kill``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pytest_vmenv.channel import Delivery, RunDir, Sized, Stdin, Wrapper, as_user
from pytest_vmenv.poll import poll_until

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
CHANNELS = {
    "ssh": Wrapper(RunDir.MKTEMP, Stdin.CHANNEL, Delivery.STREAM),
    "agent": Wrapper(RunDir.NAMED, Stdin.CHANNEL, Delivery.SIZED),
    "agent-files": Wrapper(RunDir.NAMED, Stdin.CHANNEL, Delivery.SIZED, inline_max=4),
    "guestops": Wrapper(RunDir.GIVEN, Stdin.NULL, Delivery.FILES),
}


@dataclass
class Guest:
    """One shell and one channel configuration, run as local processes under ``root``."""

    wrapper: Wrapper
    root: Path
    env: dict[str, str]

    def start(self, argv: list[str], input: bytes | None = None, name: str = "id1") -> Run:
        where: str | None = None
        if self.wrapper.rundir is RunDir.GIVEN:
            where = str(self.root / name)
            os.mkdir(where)
        elif self.wrapper.rundir is RunDir.NAMED:
            where = name
        if input is not None and where is not None:  # staged as `i`, as agent and vSphere do
            if self.wrapper.rundir is RunDir.NAMED:
                made = subprocess.run([*self.wrapper.shell, "-c", self.wrapper.setup(where)],
                                      env=self.env, capture_output=True, check=True)  # fmt: skip
                stage = Path(made.stdout.decode().strip())
            else:
                stage = Path(where)
            (stage / "i").write_bytes(input)
            input = None
        proc = subprocess.Popen(
            self.wrapper.argv(argv, where), env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.PIPE if input is not None else None,
        )  # fmt: skip
        return Run(self, proc, where, input)

    def run(self, argv: list[str], input: bytes | None = None) -> tuple[int, bytes, bytes]:
        return self.start(argv, input).result()


@dataclass
class Run:
    guest: Guest
    proc: subprocess.Popen[bytes]
    where: str | None
    input: bytes | None
    head: bytes = b""

    def result(self, timeout: float = 20) -> tuple[int, bytes, bytes]:
        """(exit code, stdout, stderr) as the channel decodes them; the run dir is gone."""
        raw, err = self.proc.communicate(self.input, timeout=timeout)
        raw = self.head + raw
        code = self.proc.returncode
        wrapper = self.guest.wrapper
        if wrapper.delivery is Delivery.STREAM:
            where, _, out = raw.partition(b"\n")
            assert not Path(where.decode()).exists()
            return code, out, err
        assert self.where is not None
        if wrapper.delivery is Delivery.FILES:
            run = Path(self.where)
            out, err = (run / "o").read_bytes(), (run / "e").read_bytes()
            shutil.rmtree(run)
            return code, out, err
        assert err == b""
        sized = Sized.parse(raw, 1 << 20)
        assert sized is not None, raw
        if sized.files is not None:
            out, err = (Path(f).read_bytes() for f in sized.files)
            assert (len(out), len(err)) == (sized.stdout_size, sized.stderr_size)
            shutil.rmtree(Path(sized.files[0]).parent)
        else:
            out, err = sized.stdout, sized.stderr
        assert not any(Path(d).exists() for d in wrapper.dirs(self.where))
        return code, out, err

    def kill(self) -> None:
        """The channel's group kill: run ``KILL`` with the run directory it was given."""
        where = self.where
        if where is None:  # MKTEMP: the directory is the first line the wrapper printed
            assert self.proc.stdout is not None
            self.head = self.proc.stdout.readline()
            where = self.head.decode().rstrip("\n")
        subprocess.run(self.guest.wrapper.kill_argv(where), env=self.guest.env, check=True,
                       timeout=10)  # fmt: skip


@pytest.fixture(params=["sh", "busybox"])
def shell(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[tuple[str, ...], str]:
    """The wrapper's shell and the ``PATH`` its commands see."""
    if request.param == "sh":
        return ("/bin/sh",), os.environ["PATH"]
    if not os.access(BUSYBOX, os.X_OK):
        pytest.skip("busybox is not installed (Debian: busybox-static, see .ci/programs)")
    bindir = tmp_path / "busybox-bin"
    bindir.mkdir()
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        (bindir / applet).symlink_to(BUSYBOX)
    return (str(bindir / "sh"),), str(bindir)


@pytest.fixture(params=list(CHANNELS))
def guest(request: pytest.FixtureRequest, shell: tuple[tuple[str, ...], str],
          tmp_path: Path) -> Guest:  # fmt: skip
    root = tmp_path / "guest"
    root.mkdir()
    prefixes = (f"{root}/run/vmenv/", f"{root}/vmenv.")
    wrapper = replace(CHANNELS[request.param], shell=shell[0], prefixes=prefixes)
    env = {"PATH": shell[1], "TMPDIR": str(root), "HOME": str(root)}
    return Guest(wrapper, root, env)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_exit_codes_signals_and_missing_programs(guest: Guest) -> None:
    script = 'printf "a\\0b\\377"; printf "E\\n" >&2; exit 3'
    assert guest.run(["sh", "-c", script]) == (3, b"a\0b\xff", b"E\n")
    assert guest.run(["true"]) == (0, b"", b"")
    assert guest.run(["sh", "-c", "kill -TERM $$"])[0] == 128 + signal.SIGTERM
    assert guest.run(["sh", "-c", "kill -KILL $$"])[0] == 128 + signal.SIGKILL
    code, _, err = guest.run(["no-such-program-vmenv"])
    assert code == 127 and b"no-such-program-vmenv" in err
    assert guest.run(["printf", "%s|", "a b", "it's", "$HOME", ""])[1] == b"a b|it's|$HOME||"


def test_stdin_is_fed_then_closed(guest: Guest) -> None:
    data = bytes(range(256)) * 300
    assert guest.run(["cat"], input=data)[1] == data
    if guest.wrapper.stdin is Stdin.CHANNEL:
        assert guest.start(["cat"], input=b"").result()[1] == b""  # a closed pipe: EOF at once
    else:
        assert guest.run(["cat"]) == (0, b"", b"")  # no input: /dev/null


def test_a_background_child_does_not_hold_the_wrapper(guest: Guest) -> None:
    started = time.monotonic()
    code, out, _ = guest.run(["sh", "-c", "sleep 30 & echo $!"])
    assert code == 0 and time.monotonic() - started < 10
    os.kill(int(out), signal.SIGKILL)


def test_the_group_kill_kills_the_command_and_its_children(guest: Guest) -> None:
    pids = guest.root / "pids"
    run = guest.start(
        ["sh", "-c", f"sleep 30 & echo $$ $! >{pids}.part; mv {pids}.part {pids}; sleep 30"]
    )
    deadline = time.monotonic() + 10
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    run.kill()
    code, _, _ = run.result(timeout=10)
    assert code == 128 + signal.SIGKILL
    group = [int(pid) for pid in pids.read_text().split()]
    # SIGKILL is delivered at once but reaped a moment later: wait for that, not longer
    poll_until(
        lambda _last: True if not any(map(_alive, group)) else None,
        timeout=5,
        what=f"the killed group {group} to be gone",
        interval=0.005,
    )


def test_the_run_directory_comes_first_and_a_failed_one_is_125(guest: Guest) -> None:
    wrapper = guest.wrapper
    if wrapper.rundir is RunDir.GIVEN:
        return  # the caller made it
    broken = guest.root / "not-a-dir"
    broken.write_text("")
    bad = replace(guest, wrapper=replace(wrapper, prefixes=(f"{broken}/",)),
                  env={**guest.env, "TMPDIR": str(broken)})  # fmt: skip
    where = "x" if wrapper.rundir is RunDir.NAMED else None
    proc = subprocess.run(bad.wrapper.argv(["true"], where), env=bad.env, capture_output=True)
    assert proc.returncode == 125 and not proc.stdout


def test_as_user_sets_env_and_switches_user() -> None:
    assert as_user(["id"], None, None, "root") == ["id"]
    assert as_user(["id"], {"A": "1 2"}, "root", "root") == ["env", "A=1 2", "id"]
    assert as_user(["id"], None, "nobody", "root") == ["runuser", "-u", "nobody", "--", "id"]
    assert as_user(["id"], None, "nobody", "vmenv")[:3] == ["sudo", "-n", "-u"]
    with pytest.raises(ValueError, match="invalid environment variable name 'A=B'"):
        as_user(["id"], {"A=B": "x"}, None, "root")
