"""CommandTests: ``execute`` as the test-author verbs see it.

Exit codes, output that is binary, large or capped, stdin, env, argv without a shell, the
timeout that kills a process group, ``user=``, and many calls at once from several threads.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ..errors import CommandFailed, CommandTimeout
from ..machine import Machine
from .fixtures import MachineMaker, require

__all__ = ["CommandTests"]

MiB = 1 << 20
THREADS = 8


def _roundtrip(machine: Machine, i: int) -> str:
    """Input in, output out and a file written and read back, as call ``i`` of many at once."""
    assert machine.succeed(f"cat; echo {i}; sleep 0.2", input=f"in-{i}\n") == f"in-{i}\n{i}\n"
    machine.write_text(f"/var/tmp/thread-{i}", f"{machine.name}-{i}")
    return machine.read_text(f"/var/tmp/thread-{i}")


class CommandTests:
    """``run``/``succeed``/``fail`` over the backend's ``execute``."""

    def test_exit_codes(self, clone: Machine) -> None:
        assert clone.run("exit 3").exit_code == 3
        assert clone.run(["/bin/sh", "-c", "exit 7"]).exit_code == 7
        assert clone.run("true").exit_code == 0
        assert clone.run("kill -9 $$").exit_code == 128 + 9
        assert clone.run(["/no/such/program"]).exit_code == 127

    def test_succeed_and_fail(self, clone: Machine) -> None:
        with pytest.raises(CommandFailed) as info:
            clone.succeed("echo out; echo err >&2; exit 4")
        message = str(info.value)
        assert "exit 4" in message and "exited with 4" in message
        assert "out" in message and "err" in message
        assert isinstance(info.value, AssertionError)
        assert clone.fail("exit 1") == ""
        with pytest.raises(CommandFailed):
            clone.fail("true")

    def test_binary_safe_output(self, clone: Machine) -> None:
        result = clone.run(r"printf '\000\377\200ok'; printf '\001\376' >&2")
        assert result.stdout_bytes == b"\x00\xff\x80ok"
        assert result.stderr_bytes == b"\x01\xfe"

    def test_large_output_and_input(self, clone: Machine) -> None:
        data = bytes(range(256)) * 4096  # 1 MiB
        result = clone.run("cat", input=data)
        assert result.stdout_bytes == data
        big = clone.run("head -c 3000000 /dev/zero")
        assert len(big.stdout_bytes) == 3_000_000

    def test_output_is_capped_per_stream(self, clone: Machine) -> None:
        result = clone.run("head -c 3000000 /dev/zero; echo err >&2", max_output=MiB)
        assert (len(result.stdout_bytes), result.stdout_dropped) == (MiB, 3_000_000 - MiB)
        assert (result.stderr, result.stderr_dropped, result.truncated) == ("err\n", 0, True)

    def test_stdin_and_env(self, clone: Machine) -> None:
        assert clone.succeed("cat", input="line\n") == "line\n"
        assert clone.succeed("echo $GREETING", env={"GREETING": "hi there"}) == "hi there\n"
        assert clone.succeed(["printf", "%s|", "a b", "c"]) == "a b|c|"

    def test_timeout_kills_the_process_group(self, clone: Machine) -> None:
        start = time.monotonic()
        with pytest.raises(CommandTimeout):
            clone.run("sleep 300 & echo $! > /var/tmp/bg.pid; sleep 300", timeout=1)
        assert time.monotonic() - start < 10
        pid = clone.succeed("cat /var/tmp/bg.pid").strip()
        clone.wait_until_fails(f"kill -0 {pid}", timeout=5)
        assert clone.run("true").exit_code == 0

    def test_background_process_does_not_hang_run(self, clone: Machine) -> None:
        start = time.monotonic()
        assert clone.run("sleep 60 &").exit_code == 0
        assert time.monotonic() - start < 5

    def test_user_runs_as_that_user(self, clone: Machine, other_user: str | None) -> None:
        require(other_user is not None, "other_user is None: no other user to run commands as")
        assert other_user is not None
        uid = clone.succeed(["id", "-u", other_user]).strip()
        assert uid.isdigit() and uid != clone.succeed("id -u").strip()
        assert clone.succeed("id -u", user=other_user).strip() == uid
        assert clone.succeed(["id", "-u"], user=other_user).strip() == uid
        clone.succeed("mkdir -p /var/tmp/shared && chmod 777 /var/tmp/shared")
        clone.succeed("touch /var/tmp/shared/mine", user=other_user)
        assert clone.succeed("stat -c %u /var/tmp/shared/mine").strip() == uid

    def test_calls_from_several_threads(self, clone: Machine, machines: MachineMaker) -> None:
        """Eight calls at once on one machine, then clones made at once and eight calls on
        them: each call gets its own output and its own machine's files."""
        with ThreadPoolExecutor(THREADS) as pool:
            got = list(pool.map(lambda i: _roundtrip(clone, i), range(THREADS)))
            assert got == [f"{clone.name}-{i}" for i in range(THREADS)]
            fleet = [clone, *pool.map(machines, ["par-a", "par-b"])]
            got = list(pool.map(lambda i: _roundtrip(fleet[i % 3], i), range(THREADS)))
        assert got == [f"{fleet[i % 3].name}-{i}" for i in range(THREADS)]
        for i in range(THREADS):
            owner = fleet[i % 3]
            for machine in fleet:
                exists = machine.run(f"test -e /var/tmp/thread-{i}").exit_code == 0
                assert exists == (machine is owner or machine is clone), (machine.name, i)
