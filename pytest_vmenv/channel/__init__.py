"""The remote command channel: one POSIX ``sh`` wrapper, and SSH (the ``ssh`` extra).

:mod:`.wrapper` builds the shell script every remote channel runs a command under (its own
process group, a pid file, output in files, ``128 + N`` on signal N) and the script that kills
that group on a timeout; the SSH channel, the libvirt guest agent and vSphere guest operations
differ only in the parameters they build it with. :class:`SSHChannel` and
:class:`SSHUnreachable` come from :mod:`.ssh`, imported on first use: it needs asyncssh.
:func:`local_copy` is where every channel writes a file it copies out (holes stay holes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .files import LocalCopy, local_copy
from .wrapper import KILL, Delivery, RunDir, Sized, Stdin, Wrapper, as_user

if TYPE_CHECKING:
    from .ssh import SSHChannel, SSHUnreachable

__all__ = [
    "KILL",
    "Delivery",
    "LocalCopy",
    "RunDir",
    "SSHChannel",
    "SSHUnreachable",
    "Sized",
    "Stdin",
    "Wrapper",
    "as_user",
    "local_copy",
]


def __getattr__(name: str) -> Any:
    if name in ("SSHChannel", "SSHUnreachable"):
        from . import ssh

        return getattr(ssh, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
