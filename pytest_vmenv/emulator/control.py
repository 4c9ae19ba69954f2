"""Host side of a guest's control socket: commands and file transfers.

Every request carries its own reply socket, so the control socket's lock is held only for
one ``sendmsg`` and any number of threads can run commands in one guest at once. A command's
stdin/stdout/stderr are pipes passed to PID 1; this side runs a ``communicate``-like poll loop
and stops reading once PID 1 reports the exit status (after draining what is buffered): a
background daemon that inherited the pipes must not make ``run`` hang.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .. import errors
from . import wire

__all__ = ["FILE_IDLE_TIMEOUT", "CommandTimedOut", "Conn", "GuestDied", "check_command"]

FILE_IDLE_TIMEOUT = 30.0
"""Seconds a file transfer may make no progress before the host gives up on it."""


class GuestDied(OSError):
    """PID 1 hung up: the guest is gone."""


class CommandTimedOut(Exception):
    """The command ran past its timeout; its process group was killed."""


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
            with mine:
                return _pump(mine, pipe, host_fd, put, idle)
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
    ) -> tuple[int, bytes, bytes]:
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
            return _communicate(mine, in_w, out_r, err_r, input, timeout)


def _drain(fd: int, sink: bytearray) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            return
        sink += chunk


def _communicate(
    ctl: socket.socket, in_w: int, out_r: int, err_r: int, data: bytes | None, timeout: float | None
) -> tuple[int, bytes, bytes]:
    """Feed stdin, collect output, wait for the exit message; owns (and closes) the fds."""
    stdin = [in_w]
    try:
        return _loop(ctl, stdin, out_r, err_r, data, timeout)
    finally:
        for fd in (*stdin, out_r, err_r):
            os.close(fd)


def _loop(
    ctl: socket.socket,
    stdin: list[int],
    out_r: int,
    err_r: int,
    data: bytes | None,
    timeout: float | None,
) -> tuple[int, bytes, bytes]:
    in_w = stdin[0]
    deadline = None if timeout is None else time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    sinks = {out_r: out, err_r: err}
    poll = select.poll()
    poll.register(ctl.fileno(), select.POLLIN)
    poll.register(out_r, select.POLLIN)
    poll.register(err_r, select.POLLIN)
    pending = memoryview(data or b"")
    stdin_open = True
    if pending:
        fcntl.fcntl(in_w, fcntl.F_SETFL, os.O_NONBLOCK)
        poll.register(in_w, select.POLLOUT)
    else:
        os.close(stdin.pop())
        stdin_open = False
    exit_code: int | None = None
    while exit_code is None:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        events = poll.poll(None if wait is None else int(wait * 1000) + 1)
        if deadline is not None and time.monotonic() >= deadline:  # even while output flows
            _kill(ctl)
            raise CommandTimedOut()
        for fd, ev in events:
            if fd == ctl.fileno():
                msg, extra = wire.recv(ctl)
                for x in extra:
                    os.close(x)
                if msg is None:
                    raise GuestDied(errno.EPIPE, "the guest died while running the command")
                if "error" in msg:
                    raise errors.BackendError(
                        f"emulator: the guest refused the command: {msg['error']}"
                    )
                if "exit" in msg:
                    exit_code = int(msg["exit"])
            elif fd in sinks:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    sinks[fd] += chunk
                else:
                    poll.unregister(fd)
            elif fd == in_w and stdin_open:
                try:
                    pending = pending[os.write(in_w, pending[: 1 << 16]) :]
                except BrokenPipeError:
                    pending = memoryview(b"")
                if not pending or ev & (select.POLLERR | select.POLLHUP):
                    poll.unregister(in_w)
                    os.close(stdin.pop())
                    stdin_open = False
    for fd, sink in sinks.items():
        _drain(fd, sink)
    return exit_code, bytes(out), bytes(err)


def _pump(ctl: socket.socket, pipe: list[int], host: int, put: bool, idle: float) -> dict[str, Any]:
    """Move data between ``host`` and our pipe end until PID 1 replies (see ``transfer``)."""
    ours = pipe[0]
    os.set_blocking(ours, False)
    poll = select.poll()
    poll.register(ctl.fileno(), select.POLLIN)
    poll.register(ours, select.POLLOUT if put else select.POLLIN)
    pending = memoryview(b"")
    reply: dict[str, Any] | None = None
    while reply is None:
        events = poll.poll(int(idle * 1000))
        if not events:
            raise TimeoutError(errno.ETIMEDOUT, f"no progress for {idle:g}s")
        for fd, ev in events:
            if fd == ctl.fileno():
                reply, extra = wire.recv(ctl)
                for x in extra:
                    os.close(x)
                if reply is None:
                    raise GuestDied(errno.EPIPE, "the guest hung up during the request")
            elif not put:
                chunk = _read(ours)
                if chunk:
                    _write_all(host, chunk)
                elif chunk is not None:
                    poll.unregister(ours)
            elif pipe:
                if not pending and not ev & select.POLLERR:
                    pending = memoryview(os.read(host, 1 << 16))
                try:
                    if pending and not ev & select.POLLERR:
                        pending = pending[os.write(ours, pending) :]
                        continue
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pass  # PID 1 gave up (its error reply follows)
                poll.unregister(ours)
                os.close(pipe.pop())  # end of file for PID 1
    if not put:
        os.set_blocking(ours, True)
        while chunk := os.read(ours, 1 << 16):  # PID 1 closed its end before replying
            _write_all(host, chunk)
    return reply


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _kill(ctl: socket.socket) -> None:
    """Ask PID 1 to kill the command's group and wait (briefly) until it has."""
    try:
        wire.send(ctl, {"op": "kill"})
        ctl.settimeout(2.0)
        while True:
            msg, extra = wire.recv(ctl)
            for x in extra:
                os.close(x)
            if msg is None or msg.get("killed"):
                return
    except OSError:
        return
