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
import os
import signal
import socket
import traceback
from collections.abc import Mapping
from typing import Any

from .. import syscalls, wire
from . import mounts, oom
from .commands import DEFAULT_PATH, RESET_SIGNALS
from .server import Init

__all__ = ["pid1_main"]

_PR_SET_DUMPABLE = 4


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
        for sig in (*RESET_SIGNALS, signal.SIGPIPE):
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
