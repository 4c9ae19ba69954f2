"""Owner tokens: which process, on which boot, owns a resource.

A token is ``BOOTID:PID:START``: a pid plus its start time names one process for ever (a
reused pid has another start), and the boot id makes every token from before a reboot dead.
"""

from __future__ import annotations

import os

__all__ = ["boot_id", "owner_alive", "owner_token", "process_start"]


def boot_id() -> str:
    """This host's boot id: an owner token from before a reboot is dead whatever its pid."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


def process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" if it does not exist).

    A pid plus its start time names one process for ever: a reused pid has another start.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat.rsplit(b")", 1)[1].split()[19].decode()


def owner_token(pid: int | None = None) -> str:
    """``BOOTID:PID:START`` of ``pid`` (default: this process): who owns a resource."""
    pid = os.getpid() if pid is None else pid
    return f"{boot_id()}:{pid}:{process_start(pid)}"


def owner_alive(token: str) -> bool:
    """Whether the process named by an :func:`owner_token` still runs (on this boot)."""
    boot, _, rest = token.partition(":")
    pid, _, start = rest.partition(":")
    if boot != boot_id() or not pid.isdigit():
        return False
    return process_start(int(pid)) == start != ""
