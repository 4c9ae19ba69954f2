"""Verified pidfds: a pid from ``meta.json`` is only ever signalled through a pidfd opened
*before* the process's start time was checked against the recorded one, so a reused pid is
never killed.
"""

from __future__ import annotations

import os
import select

from ...backend import process_start

__all__ = ["pid_alive", "pidfd", "readable"]


def pidfd(pid: int, start: str) -> int:
    """A pidfd of ``pid`` if it is still the process that started at ``start``, else -1.

    The pidfd is opened first and the start time checked after: if the check passes, the
    pidfd names that very process, even if the pid is reused later.
    """
    if pid <= 0 or not start:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    if process_start(pid) != start:
        os.close(fd)
        return -1
    return fd


def readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds (poll: any fd number works)."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(max(0, int(timeout * 1000 + 0.999))))


def pid_alive(pid: int, start: str) -> bool:
    """Whether the process recorded as ``pid``/``start`` still runs."""
    fd = pidfd(pid, start)
    if fd < 0:
        return False
    try:
        return not readable(fd, 0)
    finally:
        os.close(fd)
