"""The built-in ``emulator`` backend: Linux namespaces + overlayfs + cgroups, one PID 1 per guest.

Public surface: :class:`EmulatorBackend` (the :class:`~pytest_vmenv.backend.Backend`
implementation) and :class:`LimitNotApplied` (the warning issued once when a ``memory`` or
``cpus`` limit cannot be enforced on this host). The rest of the package is private.
"""

from __future__ import annotations

from .backend import EmulatorBackend, LimitNotApplied

__all__ = ["EmulatorBackend", "LimitNotApplied"]
