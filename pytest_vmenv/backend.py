"""The backend protocol: what a hypervisor must offer pytest-vmenv.

A backend turns a :class:`~pytest_vmenv.spec.MachineSpec` into machines. The orchestrator
calls ``build_template`` once per distinct template key, then ``clone`` for every machine a
test gets, ``execute``/``copy_in``/``copy_out`` for the test-author verbs, and ``destroy``
at teardown. Anything optional is declared in :class:`Capabilities`.

Contract shared by every method:

* Foreign exceptions (``OSError``, ``libvirtError``, ``MethodFault``) never escape: they are
  mapped to :mod:`pytest_vmenv.errors` at this boundary.
* Every resource carries ``session.id`` on the backend side, so ``owned(session.id)`` finds
  it even if the plugin's own records are lost.
* Methods may be called from several threads at once (templates are built in parallel).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .spec import MachineSpec

__all__ = [
    "Backend",
    "Capabilities",
    "MachineRef",
    "MachineState",
    "Result",
    "Session",
    "Snapshot",
    "split_network",
]


class MachineState(enum.Enum):
    """Where a machine is in its life, as ``vmenv ls`` shows it."""

    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"
    KEPT = "kept"
    GONE = "gone"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the protocol's minimum.

    ``live_snapshot``: ``snapshot``/``revert`` keep running processes and memory; without it a
    revert restarts the machine on the snapshot's disk. ``network``: ``spec.network`` is
    honoured. ``limits``: ``cpus``/``memory`` are enforced.
    """

    live_snapshot: bool = False
    network: bool = False
    limits: bool = False
    console_log: bool = False


@dataclass(frozen=True)
class Session:
    """One pytest run; every resource it makes carries ``id``."""

    id: str
    state_dir: Path
    worker_id: str = "master"
    owner_pid: int = field(default_factory=os.getpid)
    reuse: bool = False


@dataclass(frozen=True)
class Snapshot:
    """A frozen machine state a clone or a revert starts from.

    ``handle`` is the backend's own identifier (a layer path, a qcow2 file, a vSphere
    snapshot moref); ``key`` is the template key it was built for (empty for a snapshot
    taken with ``vm.snapshot``).
    """

    backend: str
    name: str
    handle: str
    key: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MachineRef:
    """A live machine as the backend knows it. ``id`` is unique within the backend."""

    backend: str
    id: str
    name: str
    session: str
    ip: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """What a command did. ``stdout``/``stderr`` are text (UTF-8, undecodable bytes replaced);
    ``stdout_bytes``/``stderr_bytes`` are exactly what the command wrote."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""

    @classmethod
    def from_bytes(cls, exit_code: int, stdout: bytes, stderr: bytes, duration: float) -> Result:
        return cls(
            exit_code,
            stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace"),
            duration,
            stdout,
            stderr,
        )

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def split_network(value: str) -> tuple[str, str | None, str]:
    """Split the network id the orchestrator hands a backend: ``NAME[/CIDR]#INSTANCE``.

    The orchestrator rewrites ``spec.network`` to a unique id per environment instance, so
    two tests that both ask for ``network="lan"`` never share a segment. ``NAME`` may itself be
    a CIDR (``network="10.77.0.0/24"``), which then is the subnet.
    """
    base, _, instance = value.partition("#")
    if "/" in base and base.replace(".", "").replace("/", "").isdigit():
        return base, base, instance
    return base, None, instance


@runtime_checkable
class Backend(Protocol):
    """A hypervisor backend. See the module docstring for the shared contract."""

    name: str

    def capabilities(self) -> Capabilities: ...

    def check(self) -> None:
        """Raise ``BackendUnavailable(name, reason)`` if this backend cannot run here."""

    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        """Boot ``spec.image``, run ``spec.provision``, and freeze the result under ``key``."""

    def clone(self, snapshot: Snapshot, spec: MachineSpec, session: Session) -> MachineRef:
        """Start a linked clone of ``snapshot``, running and ready for commands."""

    def execute(
        self,
        ref: MachineRef,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Run ``argv`` in the machine; raise ``CommandTimeout`` after killing its group."""

    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None: ...

    def copy_out(self, ref: MachineRef, src: str, dst: Path) -> None: ...

    def snapshot(self, ref: MachineRef, name: str) -> Snapshot: ...

    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        """Return ``ref`` to ``snapshot`` (one of its own, or the template it was cloned from)."""

    def console_log(self, ref: MachineRef) -> str: ...

    def destroy(self, ref: MachineRef) -> None:
        """Remove the machine and everything it holds; already gone is success."""

    def remove_template(self, snapshot: Snapshot) -> None:
        """Delete a template built by ``build_template``; already gone is success."""

    def owned(self, session: str | None = None) -> Iterable[MachineRef]:
        """Machines that carry our labels (of ``session`` only, if given)."""
