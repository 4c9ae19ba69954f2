"""Interactive shells in a guest: a real pty, relayed to the caller's terminal.

The pty is opened by the guest's PID 1 inside the guest (its own devpts instance, so the
shell's ``tty`` is a ``/dev/pts/N`` that exists there, and job control works: the shell is a
session leader with the pty as controlling terminal). The master comes back over the
request's reply socket; this side copies the caller's stdin to it and its output to the
caller's stdout until PID 1 reports the shell's exit status.

While relaying, a terminal stdin is in raw mode (so Ctrl-C, Ctrl-Z and line editing go to the
guest's line discipline, not ours) and is restored however the relay ends. The window size is
copied at start and again on SIGWINCH (when called from the main thread). A non-terminal
stdin works too: its end-of-file is sent as ``^D``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import termios
import threading
import tty
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from .. import wire
from .control import Conn, GuestDied

__all__ = ["run_shell"]

_DEFAULT_SIZE = (24, 80)


def _winsize(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def _copy_size(src: int, master: int) -> None:
    size = _winsize(src)
    if size is not None:
        with contextlib.suppress(OSError):
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_shell(
    conn: Conn,
    argv: Sequence[str] | None,
    env: Mapping[str, str],
    stdin: int = 0,
    stdout: int = 1,
) -> int:
    """Run ``argv`` (None: root's login shell) on a pty in the guest; return its exit code."""
    size = _winsize(stdin) or _winsize(stdout) or _DEFAULT_SIZE
    msg: dict[str, Any] = {
        "op": "exec",
        "argv": list(argv or []),
        "env": dict(env),
        "user": None,
        "cwd": None,
        "tty": True,
        "winsize": list(size),
    }
    mine, theirs = wire.socketpair()
    with mine:
        try:
            conn.send(msg, [theirs.fileno()])
        finally:
            theirs.close()
        reply, fds = wire.recv(mine)
        if reply is None or not fds:
            for fd in fds:
                os.close(fd)
            raise GuestDied(errno.EPIPE, "the guest hung up before the shell started")
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise OSError(f"shell: {reply['error']}")
        master = fds[0]
        try:
            return _relay(mine, master, stdin, stdout)
        finally:
            os.close(master)


def _relay(ctl: Any, master: int, stdin: int, stdout: int) -> int:
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    old_winch: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if is_tty and in_main:

        def on_winch(_sig: int, _frame: FrameType | None) -> None:
            _copy_size(stdin, master)

        old_winch = signal.signal(signal.SIGWINCH, on_winch)
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        return _loop(ctl, master, stdin, stdout, is_tty)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSAFLUSH, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)


def _loop(ctl: Any, master: int, stdin: int, stdout: int, is_tty: bool) -> int:
    relay = _Relay(ctl, master, stdin, stdout, is_tty)
    while relay.code is None:
        try:
            events = relay.poll.poll()
        except InterruptedError:
            continue
        for fd, _ev in events:
            relay.on(fd)
    if relay.master_open:  # what the shell wrote just before it exited
        fcntl.fcntl(master, fcntl.F_SETFL, fcntl.fcntl(master, fcntl.F_GETFL) | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 1 << 16):
                _write_all(stdout, chunk)
    return relay.code


class _Relay:
    """Copies between the caller's terminal and the pty until PID 1 reports the exit."""

    def __init__(self, ctl: Any, master: int, stdin: int, stdout: int, is_tty: bool) -> None:
        self.ctl, self.master, self.stdin, self.stdout, self.is_tty = (
            ctl, master, stdin, stdout, is_tty,
        )  # fmt: skip
        self.poll = select.poll()
        self.poll.register(ctl.fileno(), select.POLLIN)
        self.poll.register(master, select.POLLIN)
        self.poll.register(stdin, select.POLLIN)
        self.stdin_open = self.master_open = True
        self.code: int | None = None

    def on(self, fd: int) -> None:
        if fd == self.ctl.fileno():
            self._message()
        elif fd == self.master and self.master_open:
            self._output()
        elif fd == self.stdin and self.stdin_open:
            self._input()

    def _message(self) -> None:
        msg, extra = wire.recv(self.ctl)
        for x in extra:
            os.close(x)
        if msg is None:
            raise GuestDied(errno.EPIPE, "the guest died while the shell ran")
        if "exit" in msg:
            self.code = int(msg["exit"])

    def _output(self) -> None:
        try:
            chunk = os.read(self.master, 1 << 16)
        except OSError:  # EIO: every slave fd is closed
            chunk = b""
        if chunk:
            _write_all(self.stdout, chunk)
        else:
            self.poll.unregister(self.master)
            self.master_open = False

    def _input(self) -> None:
        chunk = os.read(self.stdin, 1 << 16)
        if chunk:
            _write_all(self.master, chunk)
            return
        self.poll.unregister(self.stdin)
        self.stdin_open = False
        if not self.is_tty:
            _write_all(self.master, b"\x04")  # end of input for the shell
