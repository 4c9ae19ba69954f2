"""A small seccomp filter for every guest process: a deny list plus a few argument rules.

Guests share the host's kernel without a user namespace, so some kernel facilities are not
namespaced at all: the keyrings (``add_key``, ``request_key``, ``keyctl``), kernel modules,
kexec, ``open_by_handle_at`` (the classic container escape), ``bpf``, ``perf_event_open``,
``userfaultfd`` and ``io_uring`` (its rings do file and network operations that seccomp never
sees). These are answered with EPERM. As in Docker's default profile, and for the same reason:

* **no new user namespaces**: ``unshare`` and ``clone`` with ``CLONE_NEWUSER`` fail with
  EPERM, and ``clone3`` (whose flags live in memory a filter cannot read) fails with ENOSYS,
  so the C library falls back to ``clone``. A user namespace would give guest root every
  capability over fresh mount, network and cgroup namespaces: the kernel attack surface
  (nf_tables, cgroupfs, overlay, ...) the dropped capabilities keep closed.
* **PID 1's limits are its own**: ``prlimit64`` setting a limit of pid 1 fails with EPERM
  (reading them works). Guest root has PID 1's uid, which is all the kernel asks to change
  another process's limits, and a PID 1 left with ``RLIMIT_NOFILE`` 4 or ``RLIMIT_CPU`` 1
  could no longer serve the host.
  Inside the guest's PID namespace only pid 1 names it.

* **a systemd guest's agent is left alone** (``program(agent=2)``, see :mod:`.pid1`): the
  process that serves the host beside systemd is pid 2, not PID 1, so the kernel's
  protection of an init does not cover it. Signals aimed at it (``kill``, ``tkill``,
  ``tgkill``, ``rt_sigqueueinfo``, ``rt_tgsigqueueinfo``), a pidfd of it (``pidfd_open``,
  the way to ``pidfd_send_signal``) and new limits for it (``prlimit64``) fail with EPERM.

PID 1 installs this filter (inherited by everything it starts) while it still holds
CAP_SYS_ADMIN, so ``no_new_privs`` is *not* needed: setuid programs (``sudo``) keep working.

The filter is classic BPF written by hand. It knows x86_64, where a 64-bit process can also
enter the kernel through the i386 (``int 0x80``) and x32 ABIs: every rule is written for the
i386 numbers too, and x32 calls are refused outright. On other architectures no filter is
installed (:data:`SUPPORTED` is False and the backend warns once).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from .. import syscalls

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
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
}
# EPERM when the flags (first argument) ask for a new user namespace
NO_NEW_USERNS: dict[str, tuple[int, int]] = {"unshare": (272, 310), "clone": (56, 120)}
# ENOSYS: its flags are behind a pointer, so the C library is sent back to clone
CLONE3 = (435, 435)
# EPERM when the first argument (the pid) is 1 and the third (the new limit) is not NULL
NOT_FOR_PID1: dict[str, tuple[int, int]] = {"prlimit64": (302, 340)}
# with an agent: EPERM when the first argument (a pid or tgid) is the agent's
NOT_FOR_AGENT: dict[str, tuple[int, int]] = {
    "kill": (62, 37),
    "tkill": (200, 238),
    "tgkill": (234, 270),
    "rt_sigqueueinfo": (129, 178),
    "rt_tgsigqueueinfo": (297, 335),
    "pidfd_open": (434, 434),
}

_CLONE_NEWUSER = 0x10000000
_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
_X32_SYSCALL_BIT = 0x40000000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | errno.EPERM
_RET_ENOSYS = 0x00050000 | errno.ENOSYS
_OFF_NR, _OFF_ARCH, _OFF_ARG0, _OFF_ARG2 = 0, 4, 16, 32  # struct seccomp_data, low words
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _abi(ins: list[tuple[int, str | int, str | int, int]], abi: int, agent: int | None) -> None:
    """The checks of one ABI (0: x86_64, 1: i386), the syscall number loaded in A."""
    ins.append((_JEQ_K, "enosys", 0, CLONE3[abi]))
    ins += [(_JEQ_K, "flags", 0, nrs[abi]) for nrs in NO_NEW_USERNS.values()]
    ins += [(_JEQ_K, "pid", 0, nrs[abi]) for nrs in NOT_FOR_PID1.values()]
    if agent is not None:
        ins += [(_JEQ_K, "agent", 0, nrs[abi]) for nrs in NOT_FOR_AGENT.values()]
    numbers = {nrs[abi] for nrs in BLOCKED.values()}
    ins += [(_JEQ_K, "deny", 0, nr) for nr in sorted(n for n in numbers if n is not None)]


def program(agent: int | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; ``agent``: the pid of a systemd
    guest's agent, protected like PID 1 and from signals (see the module docstring)."""
    ins: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}
    ins.append((_LD_W_ABS, 0, 0, _OFF_ARCH))
    ins.append((_JEQ_K, 0, "not64", _AUDIT_ARCH_X86_64))
    ins.append((_LD_W_ABS, 0, 0, _OFF_NR))
    ins.append((_JGE_K, "deny", 0, _X32_SYSCALL_BIT))
    _abi(ins, 0, agent)
    ins.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["not64"] = len(ins)
    ins.append((_JEQ_K, 0, "allow", _AUDIT_ARCH_I386))
    ins.append((_LD_W_ABS, 0, 0, _OFF_NR))
    _abi(ins, 1, agent)
    labels["allow"] = len(ins)
    ins.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["flags"] = len(ins)
    ins.append((_LD_W_ABS, 0, 0, _OFF_ARG0))
    ins.append((_JSET_K, "deny", 0, _CLONE_NEWUSER))
    ins.append((_RET_K, 0, 0, _RET_ALLOW))
    if agent is not None:
        labels["agent"] = len(ins)
        ins.append((_LD_W_ABS, 0, 0, _OFF_ARG0))  # pid_t: the kernel reads the low word only
        ins.append((_JEQ_K, "deny", 0, agent))
        ins.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["pid"] = len(ins)
    ins.append((_LD_W_ABS, 0, 0, _OFF_ARG0))  # pid_t: the kernel reads the low word only
    if agent is not None:
        ins.append((_JEQ_K, "limit", 0, agent))
    ins.append((_JEQ_K, 0, "other", 1))
    labels["limit"] = len(ins)
    ins.append((_LD_W_ABS, 0, 0, _OFF_ARG2))  # new limit: reading PID 1's stays allowed
    ins.append((_JEQ_K, 0, "deny", 0))
    ins.append((_LD_W_ABS, 0, 0, _OFF_ARG2 + 4))
    ins.append((_JEQ_K, 0, "deny", 0))
    labels["other"] = len(ins)
    ins.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["deny"] = len(ins)
    ins.append((_RET_K, 0, 0, _RET_EPERM))
    labels["enosys"] = len(ins)
    ins.append((_RET_K, 0, 0, _RET_ENOSYS))

    def rel(at: int, target: str | int) -> int:
        if not isinstance(target, str):
            return target
        offset = labels[target] - at - 1
        assert 0 <= offset < 256, (target, offset)  # BPF jumps are forward, 8 bits
        return offset

    return [(code, rel(i, jt), rel(i, jf), k) for i, (code, jt, jf, k) in enumerate(ins)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(agent: int | None = None) -> bool:
    """Install the filter on the calling thread (needs CAP_SYS_ADMIN); False if unsupported."""
    if not SUPPORTED:
        return False
    raw = b"".join(struct.pack("HBBI", *insn) for insn in program(agent))
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _Fprog(len(raw) // 8, ctypes.cast(buf, ctypes.c_void_p))
    res = syscalls.libc().prctl(
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
