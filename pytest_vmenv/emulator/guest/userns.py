"""The guest side of the unprivileged mode (see :mod:`..host.userns`): what its keeper and
PID 1 do when pytest does not run as root.

The keeper enters the user namespace (:func:`enter`); PID 1 freezes the guest with SIGSTOP
where no cgroup freezer is delegated (:func:`stop_all`) and leaves the supplementary groups
alone when ``setgroups`` is denied (:func:`setgroups_denied`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time

from .. import syscalls

__all__ = ["enter", "setgroups_denied", "stop_all"]


def enter(uid: int, gid: int, nproc: int | None = None) -> None:
    """In the keeper: a new user namespace where ``uid``/``gid`` are root (single mapping).

    ``nproc`` is then this process's ``RLIMIT_NPROC`` (soft and hard), inherited by PID 1 and
    every command: the kernel counts it per user *and* user namespace, so it bounds the
    guest's processes and threads, not the user's others on the host (see the module
    docstring).
    """
    syscalls.unshare(syscalls.CLONE_NEWUSER)
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"0 {uid} 1\n"),
        ("gid_map", f"0 {gid} 1\n"),
    ):
        with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
            f.write(text)
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def setgroups_denied() -> bool:
    """Whether this process is in a user namespace with ``setgroups`` denied."""
    try:
        with open("/proc/self/setgroups", encoding="ascii") as f:
            return f.read().strip() == "deny"
    except OSError:
        return False


def stop_all(stop: bool, timeout: float = 5.0) -> None:
    """In PID 1: SIGSTOP (or SIGCONT) every other process of the guest; wait until stopped."""
    if not stop:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGCONT)
        return
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGSTOP)  # every process of the PID namespace but PID 1
        running = [pid for pid in _pids() if _state(pid) not in ("T", "t", "Z", "X", "")]
        if not running:
            return
        if time.monotonic() > deadline:
            os.kill(-1, signal.SIGCONT)
            raise TimeoutError(f"processes {running[:5]} did not stop within {timeout:g}s")
        time.sleep(0.002)


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and n != "1"]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""
