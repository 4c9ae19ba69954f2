"""A small seccomp filter for every guest process: a deny list, answered with EPERM.

Guests share the host's kernel without a user namespace, so some kernel facilities are not
namespaced at all: the keyrings (``add_key``, ``request_key``, ``keyctl``), kernel modules,
kexec, ``open_by_handle_at`` (the classic container escape), ``bpf``, ``perf_event_open``
and ``userfaultfd``. PID 1 installs this filter (inherited by everything it starts) while it
still holds CAP_SYS_ADMIN, so ``no_new_privs`` is *not* needed: setuid programs (``sudo``)
keep working in the guest.

The filter is classic BPF written by hand. It knows x86_64, where a 64-bit process can also
enter the kernel through the i386 (``int 0x80``) and x32 ABIs: i386 numbers are listed too,
and x32 calls are refused outright. On other architectures no filter is installed
(:data:`SUPPORTED` is False and the backend warns once).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from . import _sys

__all__ = ["BLOCKED", "SUPPORTED", "install", "program"]

SUPPORTED = platform.machine() == "x86_64"

# name: (x86_64 number, i386 number or None)
BLOCKED: dict[str, tuple[int, int | None]] = {
    "add_key": (248, 286),
    "request_key": (249, 287),
    "keyctl": (250, 288),
    "kexec_load": (246, 283),
    "kexec_file_load": (320, None),
    "open_by_handle_at": (304, 342),
    "init_module": (175, 128),
    "finit_module": (313, 350),
    "delete_module": (176, 129),
    "bpf": (321, 357),
    "perf_event_open": (298, 336),
    "userfaultfd": (323, 374),
}

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
_X32_SYSCALL_BIT = 0x40000000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | errno.EPERM
_OFF_NR, _OFF_ARCH = 0, 4  # struct seccomp_data
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions."""
    x64 = sorted(n for n, _ in BLOCKED.values())
    i386 = sorted(n for _, n in BLOCKED.values() if n is not None)
    ins: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}
    ins.append((_LD_W_ABS, 0, 0, _OFF_ARCH))
    ins.append((_JEQ_K, 0, "not64", _AUDIT_ARCH_X86_64))
    ins.append((_LD_W_ABS, 0, 0, _OFF_NR))
    ins.append((_JGE_K, "deny", 0, _X32_SYSCALL_BIT))
    ins += [(_JEQ_K, "deny", 0, nr) for nr in x64]
    ins.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["not64"] = len(ins)
    ins.append((_JEQ_K, 0, "allow", _AUDIT_ARCH_I386))
    ins.append((_LD_W_ABS, 0, 0, _OFF_NR))
    ins += [(_JEQ_K, "deny", 0, nr) for nr in i386]
    labels["allow"] = len(ins)
    ins.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["deny"] = len(ins)
    ins.append((_RET_K, 0, 0, _RET_EPERM))

    def rel(at: int, target: str | int) -> int:
        return labels[target] - at - 1 if isinstance(target, str) else target

    return [(code, rel(i, jt), rel(i, jf), k) for i, (code, jt, jf, k) in enumerate(ins)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> bool:
    """Install the filter on the calling thread (needs CAP_SYS_ADMIN); False if unsupported."""
    if not SUPPORTED:
        return False
    raw = b"".join(struct.pack("HBBI", *insn) for insn in program())
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _Fprog(len(raw) // 8, ctypes.cast(buf, ctypes.c_void_p))
    res = _sys.libc().prctl(
        ctypes.c_int(_PR_SET_SECCOMP),
        ctypes.c_ulong(_SECCOMP_MODE_FILTER),
        ctypes.byref(prog),
        0,
        0,
    )
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")
    return True
