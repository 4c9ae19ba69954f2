"""Thin ctypes wrappers for the Linux syscalls Python 3.11 lacks.

Python 3.11 has no ``os.unshare``/``os.setns`` and nothing for mounts, ``pivot_root``,
``prctl`` or capabilities, so the emulator calls libc directly. Every wrapper raises
``OSError`` with the errno and a short description, so the backend boundary maps them the
same way as any other ``OSError``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct
from collections.abc import Sequence

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "close_fds_except",
    "drop_capabilities",
    "link_up",
    "mount",
    "pivot_root",
    "prctl",
    "set_comm",
    "sethostname",
    "setns",
    "umount2",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24

_SYS_PIVOT_ROOT = 155  # x86_64
_SYS_CAPSET = 126
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Loaded once, at import in the zygote: find_library runs `ldconfig -p`, which must never run
# in a guest (it would be the guest image's binary, run by PID 1 before it drops privileges).
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def libc() -> ctypes.CDLL:
    """The C library, loaded when this module was imported (never from inside a guest)."""
    return _libc


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2): move the caller into new namespaces."""
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    """setns(2): move the calling *thread* into the namespace open as ``fd``."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2); ``data`` is the comma-separated option string (at most one page)."""
    res = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(res, f"mount {fstype or 'bind'} {source} on {target} ({data[:200]})")


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2); no glibc wrapper exists, so it is a raw syscall."""
    res = _libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode())
    _check(res, "pivot_root")


def prctl(option: int, arg: int = 0) -> None:
    """prctl(2) with one argument."""
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def set_comm(name: str) -> None:
    """Name the calling thread (``/proc/PID/comm``) so ``ps`` shows what a process is."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(ctypes.c_int(15), buf, 0, 0, 0), "prctl(PR_SET_NAME)")


def sethostname(name: str) -> None:
    """sethostname(2), in the caller's UTS namespace."""
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def drop_capabilities(keep: frozenset[int], retain: frozenset[int] = frozenset()) -> None:
    """Drop every capability not in ``keep`` from the bounding set and from E/P/I.

    The bounding set matters most: a root process gets its permitted set from it at every
    ``execve``, so dropping from it is what keeps a guest's root from regaining a capability.
    ``retain`` stays in the caller's own effective and permitted sets only (never in the
    bounding set): no program the caller executes gets it back.
    """
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)
    held = keep | retain
    low = sum(1 << c for c in held if c < 32)
    high = sum(1 << (c - 32) for c in held if c >= 32)
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = struct.pack("IIIIII", low, low, 0, high, high, 0)  # effective, permitted, inheritable
    hbuf = ctypes.create_string_buffer(header, len(header))
    dbuf = ctypes.create_string_buffer(data, len(data))
    _check(_libc.syscall(_SYS_CAPSET, hbuf, dbuf), "capset")


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def link_up(name: str) -> None:
    """Bring a network interface up (``ip link set NAME up``) with an ioctl."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", name.encode(), 0)
        res = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)
        flags = struct.unpack("16sH14x", res)[1] | _IFF_UP
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags))


def close_fds_except(keep: Sequence[int]) -> None:
    """Close every descriptor above 2 that is not in ``keep``."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)
