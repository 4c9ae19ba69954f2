"""Commands and files through qemu-guest-agent: no network, no SSH, no key in the guest.

Contract: :class:`Agent` runs argv in a guest and moves files, given a function that sends
one agent command (JSON in, JSON out) to one domain. It needs only what qemu-ga offers
everywhere (``guest-exec``, ``guest-exec-status``, ``guest-file-*``) and a POSIX ``/bin/sh``
with ``setsid`` and ``cat`` in the guest (busybox has them, so has every distribution).

Why a wrapper script: qemu-ga reports a command as exited only when its output pipes close,
so ``sleep 60 &`` would hang ``run`` for a minute, and ``guest-exec`` has no process-group
kill. :data:`WRAPPER` runs the command under ``setsid`` (a new process group whose id is
written to a pid file) with its output in files on the guest's /run; the wrapper ``cat``s
them back (with their sizes in a header line, so stdout and stderr stay binary-exact) once the
command exits. A timeout kills that process group with another ``guest-exec``. Output too big
for one agent reply (libvirt caps a reply string at 4 MiB) is read with ``guest-file-read``,
only up to ``max_output`` bytes per stream: the header's sizes tell what was dropped, and the
rest never leaves the guest.
"""

from __future__ import annotations

import base64
import json
import math
import os
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_vmenv.backend import GET_LIMIT, OUTPUT_LIMIT, Result
from pytest_vmenv.errors import FileTooLarge
from pytest_vmenv.poll import poll_until

__all__ = ["Agent", "AgentError", "CommandTimedOut", "WRAPPER"]

INLINE_MAX = 2 * 1024 * 1024
CHUNK = 1024 * 1024  # host-bound reads: large replies pass
WRITE_CHUNK = 48 * 1024
INPUT_INLINE_MAX = WRITE_CHUNK  # guest-bound: a larger agent command stalls virtio-serial (TCG)
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
WRAPPER = r"""
id=$1; in=$2; shift 2
d=/run/vmenv; mkdir -p $d 2>/dev/null || d=/tmp
o=$d/$id.o; e=$d/$id.e
if [ "$in" = - ]; then exec 3<&0; else exec 3<"$in"; rm -f "$in"; fi
setsid "$@" <&3 3<&- >$o 2>$e &
echo $! >$d/$id.p
exec 3<&-
wait $!; rc=$?
ol=$(wc -c <$o); el=$(wc -c <$e)
if [ $((ol + el)) -le INLINE_MAX ]; then
  echo "vmenv-inline $ol $el"; cat $o $e; rm -f $o $e $d/$id.p
else
  echo "vmenv-files $ol $el $o $e"; rm -f $d/$id.p
fi
exit $rc
""".replace("INLINE_MAX", str(INLINE_MAX))


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
        stdin = "-"
        if input is not None and len(input) > INPUT_INLINE_MAX:
            stdin = self._stage_input(token, input)
            input = None
        pid = self.spawn(["/bin/sh", "-c", WRAPPER, "vmenv-exec", token, stdin, *argv], env, input)
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.wait(pid, deadline)
        if status is None:
            self._kill_group(token)
            self.wait(pid, time.monotonic() + 10)
            self._cleanup(token)
            raise CommandTimedOut(shlex.join(argv))
        code = _exit_code(status)
        raw = base64.b64decode(status.get("out-data", ""))
        head, _, body = raw.partition(b"\n")
        fields = head.decode("ascii", "replace").split()

        def result(out: bytes, err: bytes, olen: int, elen: int) -> Result:
            return Result.from_bytes(
                code, out, err, time.monotonic() - start,
                stdout_dropped=max(0, olen - len(out)), stderr_dropped=max(0, elen - len(err)),
            )  # fmt: skip

        if len(fields) >= 3 and fields[0] == "vmenv-inline":
            olen, elen = int(fields[1]), int(fields[2])
            keep_o, keep_e = min(olen, max_output), min(elen, max_output)
            return result(body[:keep_o], body[olen : olen + keep_e], olen, elen)
        if len(fields) >= 5 and fields[0] == "vmenv-files":
            try:
                out = self.read_file(fields[3], max_output)
                err = self.read_file(fields[4], max_output)
                return result(out, err, int(fields[1]), int(fields[2]))
            finally:
                self.run_simple(f"rm -f {shlex.quote(fields[3])} {shlex.quote(fields[4])}")
        # The wrapper itself died (e.g. killed with its group): report what it said.
        err = base64.b64decode(status.get("err-data", ""))
        return result(raw[:max_output], err[:max_output], len(raw), len(err))

    def _stage_input(self, token: str, data: bytes) -> str:
        """Write a large stdin to a guest file first (big ``input-data`` stalls the agent)."""
        for path in (f"/run/vmenv-{token}.i", f"/tmp/vmenv-{token}.i"):
            try:
                self.write_file(path, data)
                return path
            except AgentError:
                continue
        raise AgentError("cannot stage stdin in the guest (neither /run nor /tmp is writable)")

    def _kill_group(self, token: str) -> None:
        script = (
            f"for d in /run/vmenv /tmp; do p=$(cat $d/{token}.p 2>/dev/null) && "
            "kill -9 -$p 2>/dev/null; done; true"
        )
        self.run_simple(script, timeout=10)

    def _cleanup(self, token: str) -> None:
        self.run_simple(f"rm -f /run/vmenv/{token}.* /tmp/{token}.*", timeout=10)

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
        size = 0
        try:
            with open(dst, "wb") as f:
                while True:
                    got = self.call("guest-file-read", handle=handle, count=CHUNK)
                    chunk = base64.b64decode(got.get("buf-b64", ""))
                    size += len(chunk)
                    if max_size is not None and size > max_size:
                        raise FileTooLarge(machine, path, size, max_size)
                    if chunk.count(0) == len(chunk):
                        f.seek(len(chunk), os.SEEK_CUR)
                    else:
                        f.write(chunk)
                    if got.get("eof") or not got.get("count"):
                        break
                f.truncate(size)
        except BaseException:
            Path(dst).unlink(missing_ok=True)
            raise
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
