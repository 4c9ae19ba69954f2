"""The libvirt backend's one exception boundary: :data:`BOUNDARY`.

A table of rules for :class:`pytest_vmenv.errors.Boundary`, applied to every protocol method
of :class:`.backend.LibvirtBackend`:

* ``libvirtError`` of an object that is gone, in a call about a machine: ``MachineGone``;
  a connection that dropped and did not come back within :class:`.connection.Hypervisor`'s
  retries: a ``BackendError`` that asks whether libvirtd runs; any other: a ``BackendError``
  with libvirt's own message.
* the guest agent's error reply (:class:`.agent.AgentError`), a failed build of the tiny
  image (:class:`.debs.TinyBuildError`) and ``OSError``: ``BackendError``.

Nothing else is mapped: a ``ValueError`` or ``KeyError`` is a bug of ours and stays one.
"""

from __future__ import annotations

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.errors import Boundary, Call

from .agent import AgentError
from .connection import NAME, is_gone, is_transient
from .debs import TinyBuildError

__all__ = ["BOUNDARY"]


def _gone(exc: BaseException, call: Call) -> errors.VmenvError | None:
    if call.ref is None or not is_gone(exc):
        return None
    return errors.gone()(exc, call)


def _dropped(exc: BaseException, call: Call) -> errors.VmenvError | None:
    if not is_transient(exc):
        return None
    return errors.BackendError(
        f"{call.backend}: {call.what}: the connection to libvirtd failed and did not come "
        f"back in time: {exc}. Is libvirtd running (.ci/libvirt.sh start)?"
    )


def _agent(exc: BaseException, call: Call) -> errors.VmenvError:
    return errors.BackendError(f"{call.backend}: {call.what}: guest agent: {exc}")


def _tiny(exc: BaseException, call: Call) -> errors.VmenvError:
    return errors.BackendError(f"{call.backend}: building the tiny image: {exc}")


BOUNDARY = Boundary(
    NAME,
    [
        (libvirt.libvirtError, _gone),
        (libvirt.libvirtError, _dropped),
        (libvirt.libvirtError, errors.failed()),
        (AgentError, _agent),
        (TinyBuildError, _tiny),
        (OSError, errors.failed()),
    ],
)
