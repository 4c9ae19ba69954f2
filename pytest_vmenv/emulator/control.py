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

from . import wire

__all__ = ["CommandTimedOut", "Conn", "GuestDied"]


class GuestDied(OSError):
    """PID 1 hung up: the guest is gone."""


class CommandTimedOut(Exception):
    """The command ran past its timeout; its process group was killed."""


class Conn:
    """The host's end of one guest's control socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.sock.close()

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
        if not events and deadline is not None and time.monotonic() >= deadline:
            _kill(ctl)
            raise CommandTimedOut()
        for fd, ev in events:
            if fd == ctl.fileno():
                msg, extra = wire.recv(ctl)
                for x in extra:
                    os.close(x)
                if msg is None:
                    raise GuestDied(errno.EPIPE, "the guest died while running the command")
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
