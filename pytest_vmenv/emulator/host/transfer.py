"""A file transfer on the host: the copy between a host file and PID 1's pipe.

PID 1 never holds a host file: it gets one end of a pipe, and this side copies between the
pipe and the host file (:func:`pump`). A ``get`` with ``"extents"`` arrives framed
(:data:`..wire.FRAME`, see :mod:`..guest.files`) and is written at its offsets, holes left as
holes (:class:`Extents`).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
from collections.abc import Callable
from typing import Any

from .. import wire
from ..wire import FRAME
from .faults import GuestDied, TooLarge

__all__ = ["Extents", "pump"]


class Extents:
    """Writes a framed ``get`` stream (see :mod:`..guest.files`) to ``fd``, holes as holes.

    Frames must come in order and end within ``limit``; a stream that breaks that is cut
    off (:class:`TooLarge`, or ``EPROTO``). On a descriptor that cannot seek (a pipe), holes
    are written as zeros.
    """

    def __init__(self, fd: int, limit: int | None) -> None:
        self.fd = fd
        self.limit = None if limit is None else int(limit)
        self.head = b""
        self.at = 0  # where the next data byte goes
        self.left = 0  # data bytes still due in the current frame
        self.end = 0  # the end of the data seen so far
        try:
            self.pos: int | None = os.lseek(fd, 0, os.SEEK_CUR)
            self.seekable = True
        except OSError:
            self.pos, self.seekable = 0, False

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if not self.left:
                need = FRAME.size - len(self.head)
                self.head += bytes(view[:need])
                view = view[need:]
                if len(self.head) < FRAME.size:
                    return
                offset, length = FRAME.unpack(self.head)
                self.head = b""
                if offset < self.end:
                    raise OSError(errno.EPROTO, "file extents out of order")
                if self.limit is not None and offset + length > self.limit:
                    raise TooLarge(offset + length)
                self.at, self.left, self.end = offset, length, offset + length
                continue
            piece = view[: self.left]
            self._write(self.at, piece)
            self.at += len(piece)
            self.left -= len(piece)
            view = view[len(piece) :]

    def _write(self, at: int, data: memoryview) -> None:
        if self.seekable:
            while data:
                done = os.pwrite(self.fd, data, at)
                data, at = data[done:], at + done
            return
        assert self.pos is not None
        self._zeros(at - self.pos)
        _write_all(self.fd, bytes(data))
        self.pos = at + len(data)

    def _zeros(self, count: int) -> None:
        while count > 0:
            step = min(count, 1 << 16)
            _write_all(self.fd, bytes(step))
            count -= step

    def finish(self, size: int) -> None:
        """The stream ended with PID 1's reply: give the file its length ``size``."""
        if self.left or self.head:
            raise OSError(errno.EPROTO, "the file's data ended inside an extent")
        size = max(size, self.end)
        if self.limit is not None and size > self.limit:
            raise TooLarge(size)
        if self.seekable:
            os.ftruncate(self.fd, size)
        else:
            assert self.pos is not None
            self._zeros(size - self.pos)


def pump(
    ctl: socket.socket,
    pipe: list[int],
    host: int,
    put: bool,
    idle: float,
    sink: Extents | None = None,
) -> dict[str, Any]:
    """Move data between ``host`` and our pipe end until PID 1 replies (see
    :meth:`.control.Conn.transfer`); TimeoutError when nothing moves for ``idle`` seconds."""
    write = sink.feed if sink is not None else functools.partial(_write_all, host)
    ours = pipe[0]
    os.set_blocking(ours, False)
    poll = select.poll()
    poll.register(ctl.fileno(), select.POLLIN)
    poll.register(ours, select.POLLOUT if put else select.POLLIN)
    feed = _Feed(host, ours, pipe, poll)
    reply: dict[str, Any] | None = None
    while reply is None:
        events = poll.poll(int(idle * 1000))
        if not events:
            raise TimeoutError(errno.ETIMEDOUT, f"no progress for {idle:g}s")
        for fd, ev in events:
            if fd == ctl.fileno():
                reply = _reply(ctl)
            elif not put:
                _take(ours, write, poll)
            elif pipe:
                feed.step(ev)
    if not put:
        os.set_blocking(ours, True)
        while chunk := os.read(ours, 1 << 16):  # PID 1 closed its end before replying
            write(chunk)
    return reply


def _reply(ctl: socket.socket) -> dict[str, Any]:
    reply, extra = wire.recv(ctl)
    for x in extra:
        os.close(x)
    if reply is None:
        raise GuestDied(errno.EPIPE, "the guest hung up during the request")
    return reply


def _take(ours: int, write: Callable[[bytes], None], poll: select.poll) -> None:
    """A ``get``: what the pipe holds now goes to ``write``; at its end, stop polling it."""
    try:
        chunk = os.read(ours, 1 << 16)
    except BlockingIOError:
        return
    if chunk:
        write(chunk)
    else:
        poll.unregister(ours)


class _Feed:
    """A ``put``: the host file into the pipe, then end-of-file for PID 1 (``pipe`` empties)."""

    def __init__(self, host: int, ours: int, pipe: list[int], poll: select.poll) -> None:
        self.host, self.ours, self.pipe, self.poll = host, ours, pipe, poll
        self.pending = memoryview(b"")

    def step(self, ev: int) -> None:
        if not self.pending and not ev & select.POLLERR:
            self.pending = memoryview(os.read(self.host, 1 << 16))
        try:
            if self.pending and not ev & select.POLLERR:
                self.pending = self.pending[os.write(self.ours, self.pending) :]
                return
        except BlockingIOError:
            return
        except BrokenPipeError:
            pass  # PID 1 gave up (its error reply follows)
        self.poll.unregister(self.ours)
        os.close(self.pipe.pop())  # end of file for PID 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
