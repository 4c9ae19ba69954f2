"""Keep the OOM killer off a guest's PID 1 and its keeper: a command dies first.

A guest out of memory (its cgroup's limit, or the host's) loses the process with the highest
OOM score, which is mostly its resident size. PID 1 is a Python interpreter, bigger than most
commands, so a guest of many small processes would lose PID 1, and with it the machine (the
keeper's death takes PID 1 with it too). So the keeper and PID 1 score below every command:

* **shielded** (the host lets us lower a score: CAP_SYS_RESOURCE, the usual root): the keeper
  sets ``oom_score_adj`` -1000 (never chosen) before it forks PID 1, and commands run at the
  value the keeper had (``base``, normally 0). Every process inherits its parent's score
  *and* the floor a guest may lower it to, so PID 1 switches its own score to ``base`` around
  each spawn and back to -1000 after it: a command starts at ``base`` with ``base`` as its
  floor, and guest root (which lacks CAP_SYS_RESOURCE) cannot make itself unkillable.
* **not shielded** (a container without CAP_SYS_RESOURCE, or the unprivileged mode): a score
  can only be raised, so commands run at +1000 instead (the kernel then picks them before any
  process at ``base``, whatever their sizes), and PID 1 and the keeper stay at ``base``.

:func:`probe` runs in the keeper, :class:`Shield` in PID 1 (see :mod:`.keeper`, :mod:`.server`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["COMMANDS_UNSHIELDED", "Shield", "probe"]

_ADJ = "/proc/self/oom_score_adj"
_MIN = -1000
COMMANDS_UNSHIELDED = 1000


def probe() -> dict[str, Any]:
    """Read this process's score and try to go to -1000; what PID 1 needs to know."""
    with open(_ADJ, "rb") as f:
        base = int(f.read())
    try:
        with open(_ADJ, "wb") as f:
            f.write(b"%d" % _MIN)
    except OSError:
        return {"base": base, "shielded": False}
    return {"base": base, "shielded": True}


class Shield:
    """PID 1's side: its own score, and the one each command starts with.

    Made before PID 1 turns non-dumpable: its ``/proc/self`` files then belong to the
    host's root, which PID 1 is not in the user-namespace mode.
    """

    def __init__(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        base = int(state.get("base", 0))
        if state.get("shielded"):
            self.own, self.commands = _MIN, base
        else:
            self.own, self.commands = base, max(base, COMMANDS_UNSHIELDED)
        self.fd = -1
        if self.own != self.commands:
            with contextlib.suppress(OSError):
                self.fd = os.open(_ADJ, os.O_WRONLY | os.O_CLOEXEC)

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Around a fork or spawn: children start at the commands' score."""
        if self.fd < 0:
            yield
            return
        try:
            os.pwrite(self.fd, b"%d" % self.commands, 0)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.pwrite(self.fd, b"%d" % self.own, 0)
