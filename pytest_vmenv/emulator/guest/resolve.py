"""Open a guest's path in PID 1 the way the guest means it: inside its root, no magic links.

PID 1 serves the host's file requests, and its ``/proc/self`` is PID 1 itself: a guest's
symlink ``/etc/app.conf -> /proc/self/fd/1`` would make a copy write into the host file PID
1 logs to, ``-> /proc/self/exe`` read the host's Python. Those are *magic links* (``fd/*``,
``exe``, ``cwd``, ``root``, ``ns/*``, ``map_files/*``): they name an open file, not a path,
so being inside the guest's root does not confine them. Every open is done with
``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, which fails with ELOOP instead of
following one; ordinary symlinks, absolute or relative, resolve as they do for the guest.

Where ``openat2`` is missing (Linux < 5.6, or a container's seccomp profile that predates
it), :func:`_walk` resolves the path one component at a time, each opened with
``O_NOFOLLOW`` relative to the one before (so a component swapped meanwhile is never
followed), following symlinks itself, inside the root, and none that lives on procfs (where
the magic links are; ``/proc/self`` is one of those symlinks, so such paths are refused).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from .. import syscalls

__all__ = ["open_in_root"]

_SYS_OPENAT2 = 437  # the same on every architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_PROC_SUPER_MAGIC = 0x9FA0
_MAX_LINKS = 40
_STATE: dict[str, int] = {}  # "root": PID 1's "/", "openat2": 1 or 0


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


def _root() -> int:
    """PID 1's ``/`` (the guest's root once it has pivoted), opened on first use."""
    if "root" not in _STATE:
        _STATE["root"] = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return _STATE["root"]


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    """The raw call: a descriptor, or ``-errno``."""
    creates = flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0))
    how = _OpenHow(flags, mode if creates else 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    ctypes.set_errno(0)
    res = syscalls.libc().syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return int(res) if res >= 0 else -ctypes.get_errno()


def _have_openat2() -> bool:
    if "openat2" not in _STATE:
        fd = _openat2(_root(), ".", os.O_PATH | os.O_CLOEXEC, 0)
        if fd >= 0:
            os.close(fd)
        _STATE["openat2"] = int(fd >= 0)
    return bool(_STATE["openat2"])


def open_in_root(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a guest path, resolved inside PID 1's root, never via a magic link."""
    flags |= os.O_CLOEXEC
    if not _have_openat2():
        return _walk(path, flags, mode)
    fd = _openat2(_root(), path, flags, mode)
    if fd >= 0:
        return fd
    err = -fd
    if err == errno.ELOOP:
        raise OSError(err, "refused: a symlink loop, or a link to /proc's magic links", path)
    raise OSError(err, os.strerror(err), path)


def _on_proc(dirfd: int) -> bool:
    buf = _Statfs()
    if syscalls.libc().fstatfs(ctypes.c_int(dirfd), ctypes.byref(buf)) != 0:
        return True  # cannot tell: treat as procfs
    return int(buf.f_type) == _PROC_SUPER_MAGIC


def _walk(path: str, flags: int, mode: int = 0o644) -> int:
    """:func:`open_in_root` without ``openat2`` (see the module docstring)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    stack = [os.dup(_root())]  # O_PATH dirs from the root down: ".." pops one
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            here = stack[-1]
            if not parts:
                fd = _open_last(here, name, flags, mode)
                if fd >= 0:
                    return fd
            else:
                fd = _open_dir(here, name)
                if fd >= 0:
                    stack.append(fd)
                    continue
            links += 1
            if links > _MAX_LINKS or _on_proc(here):
                raise OSError(errno.ELOOP, "refused: a symlink loop, or a link in /proc", path)
            target = os.readlink(name, dir_fd=here)
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop())
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
        return os.open(".", flags, mode, dir_fd=stack[-1])  # the root, or a path ending in ".."
    finally:
        for fd in stack:
            os.close(fd)


def _open_last(here: int, name: str, flags: int, mode: int) -> int:
    """The last component, opened; -1 when it is a symlink (to be followed)."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=here)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_link(here, name):
            raise
    return -1


def _open_dir(here: int, name: str) -> int:
    """A component on the way, as an ``O_PATH`` descriptor; -1 when it is a symlink."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_link(here, name):
            raise
        return -1
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd


def _is_link(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False
