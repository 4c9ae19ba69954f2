"""What the host's end of a control socket raises of its own.

:class:`GuestDied` is an OSError (the boundary makes it MachineGone); the other two are caught
by the backend and become :class:`~pytest_vmenv.errors.CommandTimeout` and
:class:`~pytest_vmenv.errors.FileTooLarge`.
"""

from __future__ import annotations

__all__ = ["CommandTimedOut", "GuestDied", "TooLarge"]


class GuestDied(OSError):
    """PID 1 hung up: the guest is gone."""


class CommandTimedOut(Exception):
    """The command ran past its timeout; its process group was killed."""


class TooLarge(Exception):
    """A ``get`` outgrew its ``max`` while it was copied; ``size`` is where it was stopped."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size
