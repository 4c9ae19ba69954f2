"""The guest's PID 1: serves commands and file transfers over its control socket.

Each request arrives on the control socket with a private reply socket as its first file
descriptor, so concurrent callers never read each other's answers. PID 1 is single-threaded
and is the guest's init: it reaps every child, reports a command's exit status on that
command's reply socket, and kills the command's process group when the host hangs up early
(a timeout) or asks it to. When the primary control socket (the one the zygote handed over)
reaches end-of-file (the backend closed it, or pytest died), PID 1 exits and the kernel kills
everything left in the PID namespace, unless the host sent ``keep``: a kept guest lives on
until it is destroyed (``vmenv gc``, ``--vm-keep``).

Other processes reach a guest through ``<guestdir>/ctl.sock``, a SEQPACKET listener bound
before ``pivot_root`` (mode 0600 in a 0700 dir, outside the guest's root, so no guest process
can reach it): every accepted connection speaks the same protocol as the primary socket, and
its end-of-file only closes that connection. That is how ``vmenv shell`` and a sweeper talk
to a guest whose creating pytest is gone.

``exec`` with ``"tty": true`` opens a pty *inside* the guest (its own devpts instance, so
``tty`` in the guest names a real ``/dev/pts/N``), starts the command as a session leader
with the pty as controlling terminal, and hands the master back to the host with the
``pid`` message.

File requests (``put``/``get``/``write``) are served here, after ``pivot_root``, so every
path resolves inside the guest's root: a symlink in the guest, absolute or not, can never
make the host read or write outside it. File data flows through a pipe (the host copies
between it and its own file), so PID 1 never holds a host file. Every file PID 1 opens in
the guest (transfers, ``/etc/passwd``) is opened non-blocking and must be a regular file: a
FIFO planted by the guest cannot freeze PID 1.

PID 1 is not dumpable (``PR_SET_DUMPABLE`` 0): guest root cannot ptrace it, read
``/proc/1/fd`` or ``pidfd_getfd`` its control sockets. Guest root cannot change its resource
limits either (``prlimit``, see :mod:`.seccomp`), and the OOM killer picks a command before
it (:mod:`.oom`).

With ``init="systemd"`` the root is built the same way (plus what systemd needs, see
:func:`.mounts.build_root`), then PID 1 forks: the child is the *agent* (always pid 2),
which serves the control sockets exactly as PID 1 does otherwise: not dumpable, under the
same seccomp filter and capability bounds, with PID 1's OOM score (:mod:`.oom`), and the filter
refuses guest processes a signal, a pidfd or a new resource limit for pid 2 as it refuses
them PID 1's limits. PID 1 closes every host descriptor, sets its OOM score to the
commands' and execs systemd with ``container=vmenv`` (systemd.io/CONTAINER_INTERFACE);
orphans are reaped by systemd. What guest root can still do to the agent is what it can do
to itself: a ``kill -9 -1`` (every process it may signal) takes the agent too, and cuts the
guest's control channel. When the primary socket closes, the agent exits and the host kills
PID 1 (the kernel then kills the PID namespace).
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
import traceback
from collections.abc import Mapping
from typing import Any

from .. import syscalls, wire
from . import files, mounts, oom, userns
from .files import login_argv, lookup_user, which

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


_PR_SET_DUMPABLE = 4


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
            pid = self._spawn(msg, stdin, stdout, stderr)
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

    def _spawn(self, msg: Mapping[str, Any], stdin: int, stdout: int, stderr: int) -> int:
        """Start the command; a non-positive result is ``-exit_code`` of a failed start."""
        argv = [str(a) for a in msg.get("argv") or ()] or login_argv()
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
                ids = lookup_user(str(user))
                name = str(user) if not str(user).isdigit() else str(ids[0])
                env.update(HOME=ids[2], USER=name, LOGNAME=name)
        except (OSError, KeyError, ValueError) as exc:
            os.write(stderr, f"vmenv: {exc}\n".encode())
            return -126
        env.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        path = which(argv[0], env["PATH"]) if argv else None
        if path is None:
            os.write(stderr, f"vmenv: {argv[0] if argv else ''}: command not found\n".encode())
            return -127
        cwd = msg.get("cwd")
        tty = bool(msg.get("tty"))
        with self.shield.spawning():
            return self._start(path, argv, env, ids, cwd, tty, (stdin, stdout, stderr))

    def _start(
        self,
        path: str,
        argv: list[str],
        env: dict[str, str],
        ids: tuple[int, int, str, list[int]] | None,
        cwd: Any,
        tty: bool,
        fds: tuple[int, int, int],
    ) -> int:
        """posix_spawn when nothing needs doing in the child, else fork + exec."""
        stdin, stdout, stderr = fds
        if ids is None and cwd is None and not tty:
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
            except ValueError as exc:  # a NUL byte or a bad variable name
                os.write(stderr, f"vmenv: {argv[0]!r}: {exc}\n".encode())
                return -126
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                if tty:
                    fcntl.ioctl(stdin, termios.TIOCSCTTY, 0)
                for target, fd in enumerate((stdin, stdout, stderr)):
                    os.dup2(fd, target)
                os.closerange(3, 65536)  # PID 1's sockets, before any uid change
                if cwd is not None:
                    os.chdir(str(cwd))
                if ids is not None:
                    _become(ids)
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


def _become(ids: tuple[int, int, str, list[int]]) -> None:
    """Switch to a guest user (in a forked child); clear errors in a user namespace."""
    denied = userns.setgroups_denied()
    if not denied:
        os.setgroups(ids[3])
    try:
        os.setgid(ids[1])
        os.setuid(ids[0])
    except OSError as exc:
        if not denied:
            raise
        raise OSError(
            exc.errno,
            f"uid {ids[0]}/gid {ids[1]} does not exist in this guest: an unprivileged "
            "emulator guest maps only root (uid 0); run pytest as root for other users",
        ) from exc


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _listen(gdir: str) -> socket.socket:
    """Bind ``<gdir>/ctl.sock`` (0600), relative to ``gdir`` so a long path still fits."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.chdir(gdir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink("ctl.sock")
    old = os.umask(0o177)
    try:
        listener.bind("ctl.sock")
    finally:
        os.umask(old)
    listener.listen(16)
    return listener


_SYSTEMD = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")


def _exec_systemd(path: str, cfg: Mapping[str, Any]) -> None:
    """Become systemd (in PID 1, after the agent was forked): no host descriptor is left,
    stdout and stderr are the guest's console, signals are back to their defaults."""
    try:
        console = os.open("/dev/console", os.O_WRONLY | os.O_APPEND | os.O_NOCTTY)
        os.dup2(console, 1)
        os.dup2(console, 2)
        syscalls.close_fds_except([])
        for sig in (*_RESET_SIGNALS, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        _commands_score(cfg.get("oom") or {})
        env = {"container": "vmenv", "PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
        if cfg.get("machine_id"):
            env["container_uuid"] = str(cfg["machine_id"])
        os.execve(path, [path], env)
    except BaseException as exc:  # noqa: BLE001 - PID 1 must never return into the agent's code
        with contextlib.suppress(OSError):
            os.write(2, f"vmenv: cannot exec {path}: {exc}\n".encode())
    os._exit(127)


def _commands_score(state: Mapping[str, Any]) -> None:
    """Give PID 1 (about to be systemd) the OOM score of commands, and with it the floor:
    systemd and every service it starts are no harder to kill than a command, and guest
    root cannot lower them (see :mod:`.oom`). Shielded, PID 1 still holds CAP_SYS_RESOURCE
    for this write; it leaves with the exec (it is not in the bounding set)."""
    if state.get("shielded"):
        with open("/proc/self/oom_score_adj", "wb") as f:
            f.write(b"%d" % int(state.get("base", 0)))


def _fork_agent(cfg: Mapping[str, Any]) -> None:
    """For a systemd guest: fork the agent (which returns here) and exec systemd in PID 1."""
    path = next((p for p in _SYSTEMD if os.path.isfile(p)), None)
    if path is None:
        raise OSError(
            "init='systemd', but the image has no /lib/systemd/systemd: install systemd-sysv "
            "in it, or use init='none'"
        )
    if os.fork() != 0:
        _exec_systemd(path, cfg)
    if os.getpid() != mounts.AGENT_PID:  # the filter protects that pid, and only that one
        raise OSError(f"the agent is pid {os.getpid()}, not {mounts.AGENT_PID}")
    syscalls.set_comm("vmenv-agent")


def pid1_main(cfg: Mapping[str, Any], ctl_fd: int) -> None:
    """Become the guest: build the root, report ready (or the error), serve until EOF."""
    ctl = socket.socket(fileno=ctl_fd)
    try:
        host_pid = int(os.readlink("/proc/self"))  # still the host's /proc: the host pid
        listener = _listen(cfg["gdir"])  # before pivot_root: the path is the host's
        syscalls.set_comm("vmenv-init")
        console = os.open(cfg["boot_log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(console, 1)
        os.dup2(console, 2)
        os.close(null)
        os.close(console)
        mounts.build_root(cfg)
        if cfg.get("init") == "systemd":
            _fork_agent(cfg)  # PID 1 becomes systemd; the agent goes on here
        shield = oom.Shield(cfg.get("oom"))  # while /proc/self is still ours to open
        syscalls.prctl(_PR_SET_DUMPABLE, 0)  # no ptrace, /proc/1/fd or pidfd_getfd from the guest
        os.environ.clear()
        os.environ.update(PATH=DEFAULT_PATH, HOME="/root", LANG="C.UTF-8")
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        syscalls.close_fds_except([ctl.fileno(), rfd, wfd, listener.fileno(), shield.fd])
        os.write(1, f"vmenv: guest {cfg['hostname']} up\n".encode())
        wire.send(ctl, {"ready": True, "pid": host_pid})
    except BaseException:  # noqa: BLE001 - any boot failure is reported, then PID 1 exits
        text = traceback.format_exc()
        try:
            os.write(2, text.encode())
            wire.send(ctl, {"error": text[-4000:]})
        finally:
            os._exit(1)
    Init(ctl, rfd, listener, shield).serve()
