"""The built-in ``emulator`` backend: Linux namespaces + overlayfs + cgroups, one PID 1 per guest.

Public surface: :class:`EmulatorBackend` (the :class:`~pytest_vmenv.backend.Backend`
implementation) and :class:`LimitNotApplied` (the warning issued once when a ``memory`` or
``cpus`` limit cannot be enforced on this host). The rest of the package is private.

It is three kinds of process, and the package's layout follows them::

    pytest (host/, backend.py)          zygote (zygote.py)          a guest (guest/)
    ----------------------------        ------------------          ---------------------------
    EmulatorBackend                     one per backend             keeper: joins the cgroups,
      State, Guests, Machines,  spawn   instance; has imported      unshares, relays the
      templates, Channel, ...  -------> guest/ only, forks a  ----> console; forks
    spawner.Zygote (its handle)         keeper per guest            PID 1: mounts the root,
    control.Conn  <------------------------------------------->     pivots, serves commands
                       the guest's control socket                   and files (pid1, server)

Arrows in the code run one way: ``host/`` may read ``guest/``'s constants (the mount layout,
the commands' ``PATH``), never the other way round; the zygote and ``guest/`` import only
:mod:`.wire` (the messages all three speak) and :mod:`.syscalls` of the rest, so every
guest's fork stays cheap.
"""

from __future__ import annotations

from .backend import EmulatorBackend, LimitNotApplied

__all__ = ["EmulatorBackend", "LimitNotApplied"]
