"""PID 1's server: the control sockets, the running commands, and the reaping of children.

Each request arrives on a control socket with a private reply socket as its first file
descriptor, so concurrent callers never read each other's answers. PID 1 is single-threaded
and is the guest's init: it reaps every child, reports a command's exit status on that
command's reply socket, and kills the command's process group when the host hangs up early
(a timeout) or asks it to. When the primary control socket reaches end-of-file, PID 1 exits
(the kernel kills the rest of the guest) unless the host sent ``keep``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import struct
import termios
import time
from collections.abc import Mapping
from typing import Any

from .. import wire
from . import commands, files, oom, userns

__all__ = ["Init"]


class Init:
    """PID 1's state: the control sockets and the running commands."""

    def __init__(
        self, ctl: socket.socket, wake: int, listener: socket.socket, shield: oom.Shield
    ) -> None:
        self.primary = ctl.fileno()
        self.shield = shield
        self.wake = wake
        self.listener = listener
        self.kept = False
        self.poll = select.poll()
        self.ctls: dict[int, socket.socket] = {}
        self._add_ctl(ctl)
        self.poll.register(wake, select.POLLIN)
        self.poll.register(listener.fileno(), select.POLLIN)
        self.by_pid: dict[int, socket.socket] = {}
        self.by_fd: dict[int, tuple[socket.socket, int]] = {}

    def _add_ctl(self, sock: socket.socket) -> None:
        self.ctls[sock.fileno()] = sock
        self.poll.register(sock.fileno(), select.POLLIN)

    def serve(self) -> None:
        while True:
            for fd, _event in self.poll.poll():
                if fd in self.ctls:
                    self._control(self.ctls[fd])
                elif fd == self.wake:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake, 512)
                    self._reap()
                elif fd == self.listener.fileno():
                    with contextlib.suppress(OSError):
                        self._add_ctl(self.listener.accept()[0])
                elif fd in self.by_fd:
                    self._exec_socket(fd)

    def _control(self, ctl: socket.socket) -> None:
        try:
            msg, fds = wire.recv(ctl)
        except OSError:
            msg, fds = None, []
        if msg is None:
            for fd in fds:
                os.close(fd)
            if ctl.fileno() == self.primary and not self.kept:
                os._exit(0)
            self.poll.unregister(ctl.fileno())
            del self.ctls[ctl.fileno()]
            ctl.close()
            return
        if not fds:
            return
        reply = socket.socket(fileno=fds[0])
        op = msg.get("op")
        try:
            if op == "exec":
                self._exec(msg, reply, fds[1:])
                return
            try:
                result = self._file_op(op, msg, fds[1:])
            finally:
                for fd in fds[1:]:
                    os.close(fd)
            wire.send(reply, result)
        except Exception as exc:  # noqa: BLE001 - reported to the host, never fatal for PID 1
            with contextlib.suppress(OSError):
                wire.send(
                    reply,
                    {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)},
                )
        reply.close()

    def _file_op(self, op: Any, msg: Mapping[str, Any], fds: list[int]) -> dict[str, Any]:
        if op == "ping":
            return {"ok": True}
        if op == "keep":
            self.kept = True
            return {"ok": True}
        if op in ("freeze", "thaw"):  # the user-namespace mode's freezer (no cgroups)
            userns.stop_all(op == "freeze")
            return {"ok": True}
        return files.file_op(op, msg, fds)

    def _exec(self, msg: Mapping[str, Any], reply: socket.socket, fds: list[int]) -> None:
        master = -1
        if msg.get("tty"):
            master, slave = os.openpty()
            rows, cols = [*(msg.get("winsize") or []), 0, 0][:2]
            if rows and cols:
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            fds = [*fds, slave, slave, slave]
        stdin, stdout, stderr = fds
        try:
            pid = commands.spawn(msg, stdin, stdout, stderr, self.shield)
        finally:
            for fd in set(fds):
                os.close(fd)
        if master >= 0:
            try:
                wire.send(reply, {"pid": max(pid, 0)}, [master])
            finally:
                os.close(master)
            if pid > 0:
                self._watch(reply, pid)
                return
            wire.send(reply, {"exit": -pid})
            reply.close()
            return
        if pid <= 0:
            wire.send(reply, {"pid": 0})
            wire.send(reply, {"exit": -pid})
            reply.close()
            return
        wire.send(reply, {"pid": pid})
        self._watch(reply, pid)

    def _watch(self, reply: socket.socket, pid: int) -> None:
        self.by_pid[pid] = reply
        self.by_fd[reply.fileno()] = (reply, pid)
        self.poll.register(reply.fileno(), select.POLLIN)

    def _exec_socket(self, fd: int) -> None:
        sock, pid = self.by_fd[fd]
        try:
            msg, extra = wire.recv(sock)
            for x in extra:
                os.close(x)
        except OSError:
            msg = None
        if msg is not None and msg.get("op") == "kill":
            self._kill_group(pid)
            with contextlib.suppress(OSError):
                wire.send(sock, {"killed": True})
            return
        # the host hung up before the exit status: a timeout or an abandoned call
        _killpg(pid)
        self._forget(pid)

    def _kill_group(self, pid: int) -> None:
        """SIGKILL the group and reap it, so "killed" means the processes are gone."""
        _killpg(pid)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            self._reap()
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.001)

    def _forget(self, pid: int) -> None:
        sock = self.by_pid.pop(pid, None)
        if sock is not None:
            self.by_fd.pop(sock.fileno(), None)
            self.poll.unregister(sock.fileno())
            sock.close()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sock = self.by_pid.get(pid)
            if sock is not None:
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):
                    wire.send(sock, {"exit": 128 - code if code < 0 else code})
                self._forget(pid)


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
