"""The command channel: commands, file copies and shells over a guest's control socket.

Each works on a guest of this process or, through its ``ctl.sock``, of any other (see
:meth:`.guests.Guests.find`): that is what ``vmenv shell`` relies on.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import errors
from ...backend import GET_LIMIT, OUTPUT_LIMIT, MachineRef, Result
from .control import FILE_IDLE_TIMEOUT, CommandTimedOut, TooLarge
from .guests import Guests
from .state import NAME
from .terminal import run_shell

__all__ = ["Channel"]


class Channel:
    """``execute``, ``copy_in``, ``copy_out`` and ``shell`` of one backend instance."""

    def __init__(self, guests: Guests) -> None:
        self.guests = guests

    def execute(
        self,
        ref: MachineRef,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        start = time.monotonic()
        conn = self.guests.conn(ref)
        left = None if timeout is None else timeout - (time.monotonic() - start)
        try:
            code, out, err = conn.execute(
                argv, input=input, env=env, user=user, timeout=left, max_output=max_output
            )
        except CommandTimedOut:
            raise errors.CommandTimeout(ref.name, list(argv), timeout or 0.0) from None
        return Result.from_output(code, out, err, time.monotonic() - start)

    def _file_request(self, ref: MachineRef, msg: dict[str, Any], fd: int) -> dict[str, Any]:
        conn = self.guests.conn(ref)
        try:
            reply = conn.transfer(msg, fd)
        except TimeoutError as exc:
            raise errors.BackendError(
                f"{NAME}: {msg['op']} {msg['path']!r} on {ref.name!r} made no progress for "
                f"{FILE_IDLE_TIMEOUT:g}s; gave up"
            ) from exc
        if reply.get("errno") == errno.EFBIG and "size" in reply:
            raise TooLarge(int(reply["size"]))
        if "error" in reply:
            raise errors.BackendError(
                f"{NAME}: {msg['op']} {msg['path']!r} on {ref.name!r} failed: {reply['error']}"
            )
        return reply

    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        src = Path(src)
        if src.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_in {src}: is a directory; only files "
                "can be copied (pack it with tar first)"
            )
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            msg = {"op": "put", "path": dst, "mode": st.st_mode & 0o7777, "size": st.st_size}
            self._file_request(ref, msg, fd)
        finally:
            os.close(fd)

    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        """Copy ``src`` out of the guest; its holes stay holes, over ``max_size`` is refused."""
        dst = Path(dst)
        if dst.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_out to {dst}: is a directory; give the file's path"
            )
        existed = dst.exists()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        msg = {"op": "get", "path": src, "extents": True, "max": max_size}
        try:
            try:
                self._file_request(ref, msg, fd)
            except TooLarge as exc:
                assert max_size is not None
                raise errors.FileTooLarge(ref.name, src, exc.size, max_size) from None
        except BaseException:
            os.close(fd)
            fd = -1
            if not existed:
                dst.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def shell(self, ref: MachineRef, argv: Sequence[str] | None = None) -> int:
        """An interactive shell in the guest on this process's terminal; its exit code.

        ``argv`` None is root's login shell from the guest's ``/etc/passwd`` (``/bin/sh -l``
        if it has none). stdin/stdout are fds 0 and 1; a terminal stdin is put in raw mode
        while the shell runs.
        """
        conn = self.guests.conn(ref)
        env = {"TERM": os.environ.get("TERM") or "xterm"}
        return run_shell(conn, argv, env)
