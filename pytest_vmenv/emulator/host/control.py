"""Host side of a guest's control socket: commands and file transfers.

Every request carries its own reply socket, so the control socket's lock is held only for
one ``sendmsg`` and any number of threads can run commands in one guest at once. A command's
stdin/stdout/stderr are pipes passed to PID 1; this side runs a ``communicate``-like poll loop
and stops reading once PID 1 reports the exit status (after draining what is buffered, at
most one pipe's worth): a background daemon that inherited the pipes must not make ``run``
hang. ``timeout`` bounds all of it. Each stream keeps at most ``max_output`` bytes (an
:class:`~pytest_vmenv.backend.Output`); the rest is read and counted, never held.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import errors
from ...backend import OUTPUT_LIMIT, Output
from .. import wire
from ..wire import FRAME

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


class GuestDied(OSError):
    """PID 1 hung up: the guest is gone."""


class CommandTimedOut(Exception):
    """The command ran past its timeout; its process group was killed."""


class TooLarge(Exception):
    """A ``get`` outgrew its ``max`` while it was copied; ``size`` is where it was stopped."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


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

        A ``get`` with ``"extents"`` arrives framed (see :mod:`.guestfiles`) and is written
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
            sink = _Extents(host_fd, msg.get("max")) if msg.get("extents") and not put else None
            with mine:
                reply = _pump(mine, pipe, host_fd, put, idle, sink)
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
            return _communicate(mine, in_w, out_r, err_r, input, timeout, max_output)


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


def _communicate(
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
        return _loop(ctl, stdin, out_r, err_r, data, timeout, max_output)
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
    max_output: int,
) -> tuple[int, Output, Output]:
    in_w = stdin[0]
    deadline = None if timeout is None else time.monotonic() + timeout
    out, err = Output(max_output), Output(max_output)
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
                    sinks[fd].write(chunk)
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
    return exit_code, out, err


class _Extents:
    """Writes a framed ``get`` stream (see :mod:`.guestfiles`) to ``fd``, holes as holes.

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


def _pump(
    ctl: socket.socket,
    pipe: list[int],
    host: int,
    put: bool,
    idle: float,
    sink: _Extents | None = None,
) -> dict[str, Any]:
    """Move data between ``host`` and our pipe end until PID 1 replies (see ``transfer``)."""
    write = sink.feed if sink is not None else functools.partial(_write_all, host)
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
                    write(chunk)
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
            write(chunk)
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
