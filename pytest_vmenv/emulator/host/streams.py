"""A command's streams on the host: feed its stdin, collect its output, wait for its exit.

A command's stdin/stdout/stderr are pipes passed to PID 1; this side polls them and the
command's reply socket, and stops reading once PID 1 reports the exit status (after draining
what is buffered, at most one pipe's worth): a background daemon that inherited the pipes
must not make ``run`` hang. ``timeout`` bounds all of it, output flowing or not. Each stream
keeps at most ``max_output`` bytes (an :class:`~pytest_vmenv.backend.Output`); the rest is
read and counted, never held.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import time

from ... import errors
from ...backend import OUTPUT_LIMIT, Output
from .. import wire
from .faults import CommandTimedOut, GuestDied

__all__ = ["communicate"]

_DRAIN_DEFAULT = 1 << 20  # what to read after the exit when the fd is no pipe (F_GETPIPE_SZ)


def _drain(fd: int, sink: Output) -> None:
    """Read what is buffered now, at most one pipe's capacity (a few ms at most).

    A background process that inherited the pipe may keep writing after the command exited;
    one pipe's worth is what the command itself can have left unread. The guest cannot make
    its pipe larger than ``fs.pipe-max-size`` (it lacks CAP_SYS_RESOURCE).
    """
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        budget = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        budget = _DRAIN_DEFAULT
    while budget > 0:
        try:
            chunk = os.read(fd, min(budget, 1 << 16))
        except BlockingIOError:
            return
        if not chunk:
            return
        budget -= len(chunk)
        sink.write(chunk)


def communicate(
    ctl: socket.socket,
    in_w: int,
    out_r: int,
    err_r: int,
    data: bytes | None,
    timeout: float | None,
    max_output: int = OUTPUT_LIMIT,
) -> tuple[int, Output, Output]:
    """Feed stdin, collect output, wait for the exit message; owns (and closes) the fds."""
    stdin = [in_w]
    try:
        return _Command(ctl, stdin, out_r, err_r, data, max_output).wait(timeout)
    finally:
        for fd in (*stdin, out_r, err_r):
            os.close(fd)


class _Command:
    """The poll loop of one running command (``stdin`` is emptied once it is closed)."""

    def __init__(
        self,
        ctl: socket.socket,
        stdin: list[int],
        out_r: int,
        err_r: int,
        data: bytes | None,
        max_output: int,
    ) -> None:
        self.ctl = ctl
        self.stdin = stdin
        self.out, self.err = Output(max_output), Output(max_output)
        self.sinks = {out_r: self.out, err_r: self.err}
        self.poll = select.poll()
        self.poll.register(ctl.fileno(), select.POLLIN)
        self.poll.register(out_r, select.POLLIN)
        self.poll.register(err_r, select.POLLIN)
        self.pending = memoryview(data or b"")
        self.exit_code: int | None = None
        if self.pending:
            fcntl.fcntl(stdin[0], fcntl.F_SETFL, os.O_NONBLOCK)
            self.poll.register(stdin[0], select.POLLOUT)
        else:
            os.close(stdin.pop())

    def wait(self, timeout: float | None) -> tuple[int, Output, Output]:
        deadline = None if timeout is None else time.monotonic() + timeout
        ctl = self.ctl.fileno()
        while self.exit_code is None:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = self.poll.poll(None if wait is None else int(wait * 1000) + 1)
            if deadline is not None and time.monotonic() >= deadline:  # even while output flows
                _kill(self.ctl)
                raise CommandTimedOut()
            for fd, ev in events:
                if fd == ctl:
                    self._message()
                elif fd in self.sinks:
                    self._output(fd)
                elif self.stdin and fd == self.stdin[0]:
                    self._feed(ev)
        for fd, sink in self.sinks.items():
            _drain(fd, sink)
        return self.exit_code, self.out, self.err

    def _message(self) -> None:
        msg, extra = wire.recv(self.ctl)
        for x in extra:
            os.close(x)
        if msg is None:
            raise GuestDied(errno.EPIPE, "the guest died while running the command")
        if "error" in msg:
            raise errors.BackendError(f"emulator: the guest refused the command: {msg['error']}")
        if "exit" in msg:
            self.exit_code = int(msg["exit"])

    def _output(self, fd: int) -> None:
        chunk = os.read(fd, 1 << 16)
        if chunk:
            self.sinks[fd].write(chunk)
        else:
            self.poll.unregister(fd)

    def _feed(self, ev: int) -> None:
        in_w = self.stdin[0]
        try:
            self.pending = self.pending[os.write(in_w, self.pending[: 1 << 16]) :]
        except BrokenPipeError:
            self.pending = memoryview(b"")
        if not self.pending or ev & (select.POLLERR | select.POLLHUP):
            self.poll.unregister(in_w)
            os.close(self.stdin.pop())


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
