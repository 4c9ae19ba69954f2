"""Host side of a guest's control socket: :class:`Conn`, for commands and file transfers.

Every request carries its own reply socket, so the control socket's lock is held only for
one ``sendmsg`` and any number of threads can run commands in one guest at once. A command's
streams are handled by :mod:`.streams`, a file's copy by :mod:`.transfer`.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import errors
from ...backend import OUTPUT_LIMIT, Output
from .. import wire
from .faults import CommandTimedOut, GuestDied, TooLarge
from .streams import communicate
from .transfer import Extents, pump

__all__ = [
    "FILE_IDLE_TIMEOUT",
    "CommandTimedOut",
    "Conn",
    "GuestDied",
    "TooLarge",
    "check_command",
    "connect",
]

_SOCK_MAX = 100  # sun_path is 108 bytes; longer paths go through /proc/self/fd
FILE_IDLE_TIMEOUT = 30.0
"""Seconds a file transfer may make no progress before the host gives up on it."""


def _no_nul(what: str, value: str) -> None:
    if "\0" in value:
        raise errors.BackendError(f"emulator: {what} {value!r} contains a NUL byte")


def check_command(
    argv: Sequence[str], env: Mapping[str, str] | None, user: str | None, cwd: str | None
) -> None:
    """Refuse what ``execve`` cannot carry (NUL bytes, ``=`` in a variable name) up front."""
    for arg in argv:
        _no_nul("argument", str(arg))
    for key, value in (env or {}).items():
        _no_nul("environment variable", str(key))
        _no_nul(f"value of {key}", str(value))
        if not str(key) or "=" in str(key):
            raise errors.BackendError(f"emulator: invalid environment variable name {key!r}")
    for what, text in (("user", user), ("cwd", cwd)):
        if text is not None:
            _no_nul(what, str(text))


class Conn:
    """The host's end of one guest's control socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.sock.close()

    def send(self, msg: dict[str, Any], fds: Sequence[int]) -> None:
        """Send one request (its reply socket first in ``fds``); GuestDied if PID 1 is gone."""
        self._send(msg, fds)

    def _send(self, msg: dict[str, Any], fds: Sequence[int]) -> None:
        with self.lock:
            if self.sock.fileno() < 0:
                raise GuestDied(errno.EPIPE, "the guest is gone (control socket closed)")
            try:
                wire.send(self.sock, msg, fds)
            except (BrokenPipeError, ConnectionError) as exc:
                raise GuestDied(errno.EPIPE, "the guest is gone (PID 1 exited)") from exc

    def request(
        self, msg: dict[str, Any], fds: Sequence[int] = (), timeout: float | None = 60.0
    ) -> dict[str, Any]:
        """Send one file/ping request and wait for its answer."""
        mine, theirs = wire.socketpair()
        with mine:
            try:
                self._send(msg, [theirs.fileno(), *fds])
            finally:
                theirs.close()
            mine.settimeout(timeout)
            reply, extra = wire.recv(mine)
            for fd in extra:
                os.close(fd)
        if reply is None:
            raise GuestDied(errno.EPIPE, "the guest hung up during the request")
        return reply

    def transfer(
        self, msg: dict[str, Any], host_fd: int, idle: float = FILE_IDLE_TIMEOUT
    ) -> dict[str, Any]:
        """A ``put`` (``host_fd`` -> guest) or ``get`` (guest -> ``host_fd``) through a pipe.

        PID 1 never holds a host file: it gets one end of a pipe, and this side copies
        between the pipe and ``host_fd``. Raises TimeoutError when nothing moves for ``idle``
        seconds (the pipe and reply socket are then closed, which unblocks PID 1).

        A ``get`` with ``"extents"`` arrives framed (see :mod:`..guest.files`) and is written
        at its offsets, holes left as holes; past ``msg["max"]`` it raises :class:`TooLarge`.
        """
        put = msg.get("op") == "put"
        r, w = os.pipe2(os.O_CLOEXEC)
        ours, theirs_pipe = (w, r) if put else (r, w)
        mine, theirs = wire.socketpair()
        pipe = [ours]
        try:
            try:
                self._send(msg, [theirs.fileno(), theirs_pipe])
            finally:
                theirs.close()
                os.close(theirs_pipe)
            sink = Extents(host_fd, msg.get("max")) if msg.get("extents") and not put else None
            with mine:
                reply = pump(mine, pipe, host_fd, put, idle, sink)
            if sink is not None and "error" not in reply:
                sink.finish(int(reply.get("size", sink.end)))
            return reply
        finally:
            for fd in pipe:
                os.close(fd)

    def execute(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None,
        env: Mapping[str, str] | None,
        user: str | None,
        timeout: float | None,
        cwd: str | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> tuple[int, Output, Output]:
        """Run ``argv``; return (exit code, stdout, stderr) or raise :class:`CommandTimedOut`."""
        check_command(argv, env, user, cwd)
        mine, theirs = wire.socketpair()
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        msg: dict[str, Any] = {
            "op": "exec",
            "argv": list(argv),
            "env": dict(env or {}),
            "user": user,
            "cwd": cwd,
        }
        try:
            self._send(msg, [theirs.fileno(), in_r, out_w, err_w])
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            mine.close()
            raise
        finally:
            theirs.close()
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        with mine:
            return communicate(mine, in_w, out_r, err_r, input, timeout, max_output)


def connect(gdir: Path) -> Conn:
    """Open a new control connection to a running guest's PID 1 (``ctl.sock``)."""
    path = str(gdir / "ctl.sock")
    dfd = -1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        if len(path.encode()) > _SOCK_MAX:
            dfd = os.open(gdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            path = f"/proc/self/fd/{dfd}/ctl.sock"
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    finally:
        if dfd >= 0:
            os.close(dfd)
    return Conn(sock)
