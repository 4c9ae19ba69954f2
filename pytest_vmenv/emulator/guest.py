"""The guest's PID 1: serves commands and file transfers over its control socket.

Each request arrives on the control socket with a private reply socket as its first file
descriptor, so concurrent callers never read each other's answers. PID 1 is single-threaded
and is the guest's init: it reaps every child, reports a command's exit status on that
command's reply socket, and kills the command's process group when the host hangs up early
(a timeout) or asks it to. When the control socket reaches end-of-file (the backend closed it,
or pytest died), PID 1 exits and the kernel kills everything left in the PID namespace.

File requests (``put``/``get``/``write``) are served here, after ``pivot_root``, so every
path resolves inside the guest's root: a symlink in the guest, absolute or not, can never
make the host read or write outside it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
import time
import traceback
from collections.abc import Mapping
from typing import Any

from . import _sys, rootfs, wire

__all__ = ["pid1_main"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGTSTP,
)


def _lookup_user(user: str) -> tuple[int, int, str, list[int]]:
    """uid, gid, home and groups of ``user`` from the guest's own /etc/passwd and /etc/group."""
    entry: list[str] | None = None
    with open("/etc/passwd", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(":")
            if len(parts) >= 7 and (parts[0] == user or parts[2] == user):
                entry = parts
                break
    if entry is None:
        if user.isdigit():
            return int(user), int(user), "/", []
        raise KeyError(f"no user {user!r} in the guest's /etc/passwd")
    uid, gid = int(entry[2]), int(entry[3])
    groups = [gid]
    try:
        with open("/etc/group", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 4 and entry[0] in parts[3].split(","):
                    groups.append(int(parts[2]))
    except OSError:
        pass
    return uid, gid, entry[5] or "/", groups


def _which(name: str, path: str) -> str | None:
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class Init:
    """PID 1's state: the control socket and the running commands."""

    def __init__(self, ctl: socket.socket, wake: int) -> None:
        self.ctl = ctl
        self.wake = wake
        self.poll = select.poll()
        self.poll.register(ctl.fileno(), select.POLLIN)
        self.poll.register(wake, select.POLLIN)
        self.by_pid: dict[int, socket.socket] = {}
        self.by_fd: dict[int, tuple[socket.socket, int]] = {}

    def serve(self) -> None:
        while True:
            for fd, _event in self.poll.poll():
                if fd == self.ctl.fileno():
                    self._control()
                elif fd == self.wake:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake, 512)
                    self._reap()
                elif fd in self.by_fd:
                    self._exec_socket(fd)

    def _control(self) -> None:
        try:
            msg, fds = wire.recv(self.ctl)
        except OSError:
            msg, fds = None, []
        if msg is None:
            os._exit(0)
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
        path = str(msg["path"])
        if op == "put":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOCTTY, 0o600)
            try:
                _copy(fds[0], fd)
                os.fchmod(fd, int(msg["mode"]) & 0o7777)
            finally:
                os.close(fd)
            return {"ok": True}
        if op == "write":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOCTTY, 0o644)
            try:
                os.write(fd, str(msg["data"]).encode())
                os.fchmod(fd, int(msg.get("mode", 0o644)))
            finally:
                os.close(fd)
            return {"ok": True}
        if op == "get":
            fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                    raise IsADirectoryError(f"{path!r} is {kind}; only files can be copied")
                _copy(fd, fds[0])
            finally:
                os.close(fd)
            return {"ok": True, "mode": st.st_mode & 0o7777}
        raise ValueError(f"unknown operation {op!r}")

    def _exec(self, msg: Mapping[str, Any], reply: socket.socket, fds: list[int]) -> None:
        stdin, stdout, stderr = fds
        try:
            pid = self._spawn(msg, stdin, stdout, stderr)
        finally:
            for fd in fds:
                os.close(fd)
        if pid <= 0:
            wire.send(reply, {"pid": 0})
            wire.send(reply, {"exit": -pid})
            reply.close()
            return
        wire.send(reply, {"pid": pid})
        self.by_pid[pid] = reply
        self.by_fd[reply.fileno()] = (reply, pid)
        self.poll.register(reply.fileno(), select.POLLIN)

    def _spawn(self, msg: Mapping[str, Any], stdin: int, stdout: int, stderr: int) -> int:
        """Start the command; a non-positive result is ``-exit_code`` of a failed start."""
        argv = [str(a) for a in msg["argv"]]
        user = msg.get("user")
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": "/root",
            "USER": "root",
            "LOGNAME": "root",
            "TERM": "dumb",
            "LANG": "C.UTF-8",
        }
        ids: tuple[int, int, str, list[int]] | None = None
        try:
            if user is not None:
                ids = _lookup_user(str(user))
                name = str(user) if not str(user).isdigit() else str(ids[0])
                env.update(HOME=ids[2], USER=name, LOGNAME=name)
        except (OSError, KeyError, ValueError) as exc:
            os.write(stderr, f"vmenv: {exc}\n".encode())
            return -126
        env.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        path = _which(argv[0], env["PATH"]) if argv else None
        if path is None:
            os.write(stderr, f"vmenv: {argv[0] if argv else ''}: command not found\n".encode())
            return -127
        cwd = msg.get("cwd")
        if ids is None and cwd is None:
            try:
                return os.posix_spawn(
                    path,
                    argv,
                    env,
                    setsid=True,
                    setsigdef=_RESET_SIGNALS,
                    setsigmask=(),
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, stdin, 0),
                        (os.POSIX_SPAWN_DUP2, stdout, 1),
                        (os.POSIX_SPAWN_DUP2, stderr, 2),
                    ],
                )
            except OSError as exc:
                os.write(stderr, f"vmenv: {argv[0]}: {exc.strerror}\n".encode())
                return -126 if exc.errno != 2 else -127
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                for target, fd in enumerate((stdin, stdout, stderr)):
                    os.dup2(fd, target)
                if cwd is not None:
                    os.chdir(str(cwd))
                if ids is not None:
                    os.setgroups(ids[3])
                    os.setgid(ids[1])
                    os.setuid(ids[0])
                for sig in _RESET_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                os.execve(path, argv, env)
            except BaseException as exc:  # noqa: BLE001 - a forked child must never return
                os.write(2, f"vmenv: {argv[0]}: {exc}\n".encode())
            os._exit(127)
        return pid

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


def _copy(src: int, dst: int) -> None:
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def pid1_main(cfg: Mapping[str, Any], ctl_fd: int) -> None:
    """Become the guest: build the root, report ready (or the error), serve until EOF."""
    ctl = socket.socket(fileno=ctl_fd)
    try:
        host_pid = int(os.readlink("/proc/self"))  # still the host's /proc: the host pid
        _sys.set_comm("vmenv-init")
        console = os.open(cfg["boot_log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(console, 1)
        os.dup2(console, 2)
        os.close(null)
        os.close(console)
        rootfs.build_root(cfg)
        os.environ.clear()
        os.environ.update(PATH=DEFAULT_PATH, HOME="/root", LANG="C.UTF-8")
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        rootfs.close_fds_except([ctl.fileno(), rfd, wfd])
        os.write(1, f"vmenv: guest {cfg['hostname']} up\n".encode())
        wire.send(ctl, {"ready": True, "pid": host_pid})
    except BaseException:  # noqa: BLE001 - any boot failure is reported, then PID 1 exits
        text = traceback.format_exc()
        try:
            os.write(2, text.encode())
            wire.send(ctl, {"error": text[-4000:]})
        finally:
            os._exit(1)
    Init(ctl, rfd).serve()
