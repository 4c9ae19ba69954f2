"""Commands and files through qemu-guest-agent: no network, no SSH, no key in the guest.

Contract: :class:`Agent` runs argv in a guest and moves files, given a function that sends
one agent command (JSON in, JSON out) to one domain. It needs only what qemu-ga offers
everywhere (``guest-exec``, ``guest-exec-status``, ``guest-file-*``) and a POSIX ``/bin/sh``
with ``setsid`` and ``cat`` in the guest (busybox has them, so has every distribution).

Why a wrapper script: qemu-ga reports a command as exited only when its output pipes close,
so ``sleep 60 &`` would hang ``run`` for a minute, and ``guest-exec`` has no process-group
kill. The command runs under the channel wrapper (:mod:`pytest_vmenv.channel`, :data:`WRAPPER`)
in its own process group with its output in files under a run directory named by a random id
(``/run/vmenv/ID``, else ``/tmp/vmenv.ID``), so the group's pid file is known before the command
starts: a timeout kills that group with another ``guest-exec``. Once the command exits, the
wrapper ``cat``s both files back with their sizes in a header line (stdout and stderr stay
binary-exact). Output too big for one agent reply (libvirt caps a reply string at 4 MiB) is
read with ``guest-file-read``, only up to ``max_output`` bytes per stream: the header's sizes
tell what was dropped, and the rest never leaves the guest. A stdin too big for one
``guest-exec`` is written to the run directory first.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_vmenv.backend import GET_LIMIT, OUTPUT_LIMIT, Result
from pytest_vmenv.channel import Delivery, RunDir, Sized, Stdin, Wrapper, local_copy
from pytest_vmenv.errors import FileTooLarge
from pytest_vmenv.poll import poll_until

__all__ = ["Agent", "AgentError", "CommandTimedOut", "WRAPPER"]

CHUNK = 1024 * 1024  # host-bound reads: large replies pass
WRITE_CHUNK = 48 * 1024
INPUT_INLINE_MAX = WRITE_CHUNK  # guest-bound: a larger agent command stalls virtio-serial (TCG)
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
WRAPPER = Wrapper(RunDir.NAMED, Stdin.CHANNEL, Delivery.SIZED)


class AgentError(Exception):
    """The agent answered with an error (``desc`` is its message)."""


class CommandTimedOut(Exception):
    """The command ran past its timeout; its process group was killed."""


class _Pending(Exception):
    """A command still runs at its deadline (:meth:`Agent.wait` says None)."""


Send = Callable[[str, int], str]


class Agent:
    """One guest's agent; ``send(json_text, timeout_s)`` returns the agent's JSON reply."""

    def __init__(self, send: Send) -> None:
        self._send = send

    def call(self, command: str, timeout: int = 30, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        text = self._send(json.dumps(msg), timeout)
        try:
            reply = json.loads(text)
        except ValueError:
            raise AgentError(f"{command}: the agent's reply is no JSON: {text[:200]!r}") from None
        if not isinstance(reply, dict):
            raise AgentError(f"{command}: the agent's reply is no JSON object: {text[:200]!r}")
        if "error" in reply:
            raise AgentError(str(reply["error"].get("desc", reply["error"])))
        return reply.get("return")

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        capture: bool = True,
    ) -> int:
        args: dict[str, Any] = {
            "path": argv[0],
            "arg": list(argv[1:]),
            "env": [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()],
            "capture-output": capture,
        }
        if input:
            args["input-data"] = base64.b64encode(input).decode()
        return int(self.call("guest-exec", **args)["pid"])

    def wait(self, pid: int, deadline: float | None) -> dict[str, Any] | None:
        """The exec status once ``pid`` exited, or None at ``deadline`` (monotonic)."""

        def exited(last_try: bool) -> dict[str, Any] | None:
            status: dict[str, Any] = self.call("guest-exec-status", pid=pid)
            return status if status.get("exited") else None

        left = math.inf if deadline is None else deadline - time.monotonic()
        try:
            return poll_until(exited, timeout=left, what=f"guest-exec {pid}", interval=0.002,
                              max_interval=0.05, error=_Pending)  # fmt: skip
        except _Pending:
            return None

    def run_simple(self, script: str, timeout: float = 30.0) -> tuple[int, bytes]:
        """``/bin/sh -c script`` without the wrapper (for housekeeping); (exit code, stdout)."""
        pid = self.spawn(["/bin/sh", "-c", script])
        status = self.wait(pid, time.monotonic() + timeout)
        if status is None:
            raise CommandTimedOut(script)
        return _exit_code(status), base64.b64decode(status.get("out-data", ""))

    def execute(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        """Run ``argv`` through :data:`WRAPPER`; at most ``max_output`` bytes per stream kept.

        Exit codes follow the shell: a signal N is 128+N, a missing program 127. Raises
        :class:`CommandTimedOut` after killing the command's process group.
        """
        start = time.monotonic()
        if user not in (None, "root"):
            argv = ["su", "-s", "/bin/sh", "-c", shlex.join(argv), str(user)]
        token = secrets.token_hex(6)
        if input is not None and len(input) > INPUT_INLINE_MAX:
            self._stage_input(token, input)
            input = None
        pid = self.spawn(WRAPPER.argv(argv, token), env, input)
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.wait(pid, deadline)
        if status is None:
            self._kill_group(token)
            self.wait(pid, time.monotonic() + 10)
            self._cleanup(token)
            raise CommandTimedOut(shlex.join(argv))
        code = _exit_code(status)
        raw = base64.b64decode(status.get("out-data", ""))

        def result(out: bytes, err: bytes, olen: int, elen: int) -> Result:
            return Result.from_bytes(
                code, out, err, time.monotonic() - start,
                stdout_dropped=max(0, olen - len(out)), stderr_dropped=max(0, elen - len(err)),
            )  # fmt: skip

        sized = Sized.parse(raw, max_output)
        if sized is None:  # the wrapper itself died (e.g. killed with its group): what it said
            err = base64.b64decode(status.get("err-data", ""))
            return result(raw[:max_output], err[:max_output], len(raw), len(err))
        if sized.files is None:
            return result(sized.stdout, sized.stderr, sized.stdout_size, sized.stderr_size)
        try:
            out = self.read_file(sized.files[0], max_output)
            err = self.read_file(sized.files[1], max_output)
            return result(out, err, sized.stdout_size, sized.stderr_size)
        finally:
            self._cleanup(token)

    def _stage_input(self, token: str, data: bytes) -> None:
        """Write a large stdin to the run directory first (big ``input-data`` stalls the agent)."""
        code, out = self.run_simple(WRAPPER.setup(token))
        where = out.decode("utf-8", "replace").strip()
        if code != 0 or not where:
            raise AgentError("cannot stage stdin in the guest (neither /run nor /tmp is writable)")
        self.write_file(f"{where}/i", data)

    def _kill_group(self, token: str) -> None:
        pid = self.spawn(WRAPPER.kill_argv(token))
        self.wait(pid, time.monotonic() + 10)

    def _cleanup(self, token: str) -> None:
        self.run_simple("rm -rf " + shlex.join(WRAPPER.dirs(token)), timeout=10)

    # -- files --------------------------------------------------------------------------
    def read_file(self, path: str, limit: int | None = None) -> bytes:
        """The file's first ``limit`` bytes (None: all of it)."""
        handle = self.call("guest-file-open", path=path, mode="r")
        chunks = []
        size = 0
        try:
            while limit is None or size < limit:
                want = CHUNK if limit is None else min(CHUNK, limit - size)
                got = self.call("guest-file-read", handle=handle, count=want)
                chunks.append(base64.b64decode(got.get("buf-b64", ""))[:want])
                size += len(chunks[-1])
                if got.get("eof") or not got.get("count"):
                    break
        finally:
            self.call("guest-file-close", handle=handle)
        return b"".join(chunks)

    def copy_out(
        self, path: str, dst: Path, max_size: int | None = GET_LIMIT, machine: str = "guest"
    ) -> None:
        """Stream the guest file ``path`` to ``dst``: zero blocks as holes, over ``max_size``
        refused (:class:`FileTooLarge`, no ``dst`` left)."""
        handle = self.call("guest-file-open", path=path, mode="r")
        try:
            with local_copy(dst) as out:
                while True:
                    got = self.call("guest-file-read", handle=handle, count=CHUNK)
                    chunk = base64.b64decode(got.get("buf-b64", ""))
                    if max_size is not None and out.size + len(chunk) > max_size:
                        raise FileTooLarge(machine, path, out.size + len(chunk), max_size)
                    out.write(chunk)
                    if got.get("eof") or not got.get("count"):
                        break
        finally:
            self.call("guest-file-close", handle=handle)

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        handle = self.call("guest-file-open", path=path, mode="w")
        try:
            for start in range(0, len(data), WRITE_CHUNK):
                piece = data[start : start + WRITE_CHUNK]
                args: dict[str, Any] = {
                    "buf-b64": base64.b64encode(piece).decode(),
                    "count": len(piece),
                }
                self.call("guest-file-write", handle=handle, **args)
        finally:
            self.call("guest-file-close", handle=handle)
        if mode is not None:
            self.run_simple(f"chmod {mode & 0o7777:o} {shlex.quote(path)}")


def _exit_code(status: Mapping[str, Any]) -> int:
    if "signal" in status:
        return 128 + int(status["signal"])
    return int(status.get("exitcode", 0))
