"""PID 1's file handling: transfers and the guest's account files, never blocking.

Runs in the guest's PID 1 after ``pivot_root``, so every path resolves inside the guest.
Every file is opened non-blocking and must be a regular file (:func:`_open_regular`): a FIFO
the guest planted (at a transfer's path, or as ``/etc/passwd``) is refused instead of
freezing PID 1. Paths resolve inside the guest's root and never through a magic link such
as ``/proc/self/fd/1`` (:mod:`.resolve`). Transfer data comes and goes through a pipe from
the host (see :meth:`.control.Conn.transfer`), so PID 1 never holds a host file.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from typing import Any

from .resolve import open_in_root

__all__ = ["file_op", "login_argv", "lookup_user", "which"]


def _open_regular(path: str, flags: int, mode: int = 0o644) -> tuple[int, os.stat_result]:
    """Open a guest file without blocking (a FIFO would), refusing anything but a file."""
    fd = open_in_root(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise IsADirectoryError(f"{path!r} is {kind}; only files can be copied")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _text(path: str) -> Any:
    return os.fdopen(_open_regular(path, os.O_RDONLY)[0], encoding="utf-8", errors="replace")


def lookup_user(user: str) -> tuple[int, int, str, list[int]]:
    """uid, gid, home and groups of ``user`` from the guest's own /etc/passwd and /etc/group."""
    entry: list[str] | None = None
    with _text("/etc/passwd") as f:
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
        with _text("/etc/group") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 4 and entry[0] in parts[3].split(","):
                    groups.append(int(parts[2]))
    except OSError:
        pass
    return uid, gid, entry[5] or "/", groups


def which(name: str, path: str) -> str | None:
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def login_argv() -> list[str]:
    """root's login shell from the guest's /etc/passwd if it exists inside, else /bin/sh."""
    shell = "/bin/sh"
    with contextlib.suppress(OSError), _text("/etc/passwd") as f:
        for line in f:
            parts = line.rstrip("\n").split(":")
            if len(parts) >= 7 and parts[2] == "0" and parts[6]:
                shell = parts[6]
                break
    if not os.path.isfile(shell):
        shell = "/bin/sh"
    return [shell, "-l"]


def file_op(op: Any, msg: Mapping[str, Any], fds: list[int]) -> dict[str, Any]:
    """Serve ``put``/``write``/``get``; ``fds[0]`` is the pipe to or from the host."""
    path = str(msg["path"])
    if op == "put":
        fd, _st = _open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = _copy(fds[0], fd)
            os.fchmod(fd, int(msg["mode"]) & 0o7777)
        finally:
            os.close(fd)
        if msg.get("size") is not None and size != int(msg["size"]):
            raise OSError(f"{path!r}: got {size} of {msg['size']} bytes (the host gave up)")
        return {"ok": True}
    if op == "write":
        fd, _st = _open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, str(msg["data"]).encode())
            os.fchmod(fd, int(msg.get("mode", 0o644)))
        finally:
            os.close(fd)
        return {"ok": True}
    if op == "get":
        fd, st = _open_regular(path, os.O_RDONLY)
        try:
            _copy(fd, fds[0])
        finally:
            os.close(fd)
        return {"ok": True, "mode": st.st_mode & 0o7777}
    raise ValueError(f"unknown operation {op!r}")


def _copy(src: int, dst: int) -> int:
    total = 0
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return total
        total += len(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
