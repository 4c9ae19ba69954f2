"""How PID 1 starts a command: its environment, its user, and posix_spawn or fork + exec.

A command is a session leader (its process group is what a timeout kills), starts with
default signal dispositions and an empty signal mask, and inherits no descriptor of PID 1.
Its user comes from the guest's own ``/etc/passwd`` (:mod:`.files`); a start that fails is
reported as exit status 126 or 127 with the reason on its stderr, as a shell would.
"""

from __future__ import annotations

import fcntl
import os
import signal
import termios
from collections.abc import Mapping
from typing import Any

from . import oom, userns
from .files import login_argv, lookup_user, which

__all__ = ["DEFAULT_PATH", "RESET_SIGNALS", "spawn"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESET_SIGNALS = (
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


def spawn(msg: Mapping[str, Any], stdin: int, stdout: int, stderr: int, shield: oom.Shield) -> int:
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
    with shield.spawning():
        return _start(path, argv, env, ids, cwd, tty, (stdin, stdout, stderr))


def _start(
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
                setsigdef=RESET_SIGNALS,
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
            for sig in RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            os.execve(path, argv, env)
        except BaseException as exc:  # noqa: BLE001 - a forked child must never return
            os.write(2, f"vmenv: {argv[0]}: {exc}\n".encode())
        os._exit(127)
    return pid


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
            "emulator guest maps only root (uid 0) when the user has no subordinate ids; add "
            "them (/etc/subuid, /etc/subgid: usermod --add-subuids/--add-subgids) for a full "
            "map, or run pytest as root",
        ) from exc
