"""PID 1's file handling: transfers and the guest's account files, never blocking.

Runs in the guest's PID 1 after ``pivot_root``, so every path resolves inside the guest.
Every file is opened non-blocking and must be a regular file (:func:`_open_regular`): a FIFO
the guest planted (at a transfer's path, or as ``/etc/passwd``) is refused instead of
freezing PID 1. Paths resolve inside the guest's root and never through a magic link such
as ``/proc/self/fd/1`` (:mod:`.resolve`). Transfer data comes and goes through a pipe from
the host (see :meth:`..host.control.Conn.transfer`), so PID 1 never holds a host file.

A ``get`` with ``"extents": true`` sends the file as frames, each a header :data:`FRAME`
(offset, length) and that many bytes: only the data the filesystem reports
(``SEEK_DATA``/``SEEK_HOLE``), so a hole costs nothing on the way and stays a hole on the
host. The reply's ``size`` is the file's length (a trailing hole included). With ``"max"``, a
file longer than that is refused before anything is sent (``errno`` EFBIG, its ``size``),
or stopped where it outgrows it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping
from typing import Any

from ..wire import FRAME
from .resolve import open_in_root

__all__ = ["file_op", "login_argv", "lookup_user", "which"]

_CHUNK = 1 << 20


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
        limit = None if msg.get("max") is None else int(msg["max"])
        try:
            if limit is not None and st.st_size > limit:
                return _too_big(path, st.st_size)
            if not msg.get("extents"):
                _copy(fd, fds[0])
                return {"ok": True, "mode": st.st_mode & 0o7777}
            size = _send_extents(fd, fds[0], st.st_size, limit)
        finally:
            os.close(fd)
        if size < 0:
            return _too_big(path, -size)
        return {"ok": True, "mode": st.st_mode & 0o7777, "size": size}
    raise ValueError(f"unknown operation {op!r}")


def _too_big(path: str, size: int) -> dict[str, Any]:
    return {"error": f"{path!r} is larger than the limit", "errno": errno.EFBIG, "size": size}


def _frame(dst: int, offset: int, data: bytes) -> None:
    parts = [memoryview(FRAME.pack(offset, len(data))), memoryview(data)]
    while parts:
        done = os.writev(dst, parts)
        while parts and done >= len(parts[0]):
            done -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][done:]


def _send_extents(src: int, dst: int, st_size: int, limit: int | None) -> int:
    """Send ``src``'s data extents as frames; the file's length, or ``-length`` past ``limit``.

    A pseudo-file (``/proc``: size 0, or no ``SEEK_DATA``) is read to its end instead. A read
    that ends before the extent the filesystem reported ends the file there (sysfs reports
    4096 bytes for every attribute).
    """
    pos = 0
    if st_size > 0:
        while True:
            try:
                data = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    break  # no SEEK_DATA here: read the rest as a stream
                size = max(pos, os.fstat(src).st_size)  # no data past pos: a hole to the end
                return -size if limit is not None and size > limit else size
            hole = os.lseek(src, data, os.SEEK_HOLE)
            while data < hole:
                chunk = os.pread(src, min(_CHUNK, hole - data), data)
                if not chunk:
                    return data
                if limit is not None and data + len(chunk) > limit:
                    return -(data + len(chunk))
                _frame(dst, data, chunk)
                data += len(chunk)
            pos = hole
    os.lseek(src, pos, os.SEEK_SET)
    while True:
        want = _CHUNK if limit is None else min(_CHUNK, limit + 1 - pos)
        chunk = os.read(src, max(want, 1))
        if not chunk:
            return pos
        if limit is not None and pos + len(chunk) > limit:
            return -(pos + len(chunk))
        _frame(dst, pos, chunk)
        pos += len(chunk)


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
