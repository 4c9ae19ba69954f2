"""VsphereBackend: linked clones from a template snapshot on vCenter/ESXi, through pyvmomi.

Images are templates (``{ template = "debian-12", snapshot = "clean" }``). The backend is the
protocol's face over parts that each do one thing: the shared login (:mod:`.connection`),
where VMs go and come from (:mod:`.layout`), the machines (:mod:`.machines`), the templates
(:mod:`.templates`) and the command channel of each machine (:mod:`.channels`: SSH when
configured, else VMware Tools guest operations). Every protocol method maps foreign
exceptions at the one boundary, :data:`.faults.BOUNDARY`.

Every method that takes a :class:`MachineRef` works from any process on a ref from
:meth:`owned` (the ref's ``id`` is the VM's managed object id), which is how ``vmenv gc`` and
the crash sweeper remove what dead sessions left.

``live_snapshot`` is False: snapshots are taken without memory, so a revert powers the VM
back on from the snapshot's disk. ``network`` maps a spec's network name to a port group;
it is not a private segment per environment, so the ``network`` capability is False.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_vmenv import errors
from pytest_vmenv.backend import (
    GET_LIMIT,
    OUTPUT_LIMIT,
    Capabilities,
    MachineRef,
    Network,
    Result,
    Session,
    Snapshot,
)

from .channels import Channels, tools_ip
from .config import VsphereConfig
from .connection import Connection, Link
from .faults import BOUNDARY, NAME, Server
from .layout import Layout
from .machines import Machines
from .templates import Templates

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["VsphereBackend"]


class VsphereBackend:
    """The ``vsphere`` backend (see the module docstring); thread-safe."""

    name = NAME
    builtin_images: tuple[str, ...] = ()

    def __init__(
        self, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.config = VsphereConfig.load(options or {}, environ)
        self._link = Link(self.config)
        self._layout = Layout(self._link)
        self._channels = Channels(self._link, self.guest_endpoint)
        self._machines = Machines(self._link, self._layout, self._channels)
        self._templates = Templates(self._layout, self._machines, self._channels)

    def __repr__(self) -> str:
        return f"<VsphereBackend {self.config.user}@{self.config.host}:{self.config.port}>"

    @property
    def conn(self) -> Connection:
        """The process's logged-in connection (logs in on first use)."""
        return self._link.conn

    def _vm(self, moref: str) -> Any:
        return self._machines.vm(moref)

    def _split(self, snapshot: Snapshot) -> tuple[Any, Any]:
        return self._machines.split(snapshot)

    def guest_endpoint(self, ref: MachineRef) -> tuple[str, int]:
        """Where SSH reaches ``ref``'s guest: its Tools-reported IP and the configured port.

        The one seam for a lab whose guests share an address (vcsim's tests override it).
        """
        ip = ref.ip or tools_ip(self._link, self._vm(ref.id))
        if not ip:
            raise errors.BackendError(f"{NAME}: machine {ref.name!r} has no IP (VMware Tools)")
        return str(ip), self.config.ssh_port

    # -- protocol -----------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """``outbound``: a VM's way out is its port group's (``network`` in the config); the
        backend neither adds nor removes one, so ``outbound=True`` is accepted as such."""
        return Capabilities(
            live_snapshot=False, network=False, limits=True, console_log=False, outbound=True
        )

    def check(self) -> None:
        with BOUNDARY.guard("read the inventory", Server(self.config)):
            self._link.call(lambda: self.conn.content.about.fullName)
            _ = self._layout.place

    @BOUNDARY
    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        return self._templates.build(spec, key, session)

    @BOUNDARY
    def clone(
        self,
        snapshot: Snapshot,
        spec: MachineSpec,
        session: Session,
        network: Network | None = None,
    ) -> MachineRef:
        return self._machines.clone(snapshot, spec, session, network)

    @BOUNDARY
    def execute(
        self,
        ref: MachineRef,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        return self._channels.execute(
            ref, argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
        )

    @BOUNDARY
    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        self._channels.copy_in(ref, src, dst)

    @BOUNDARY
    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        self._channels.copy_out(ref, src, dst, max_size=max_size)

    @BOUNDARY
    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        return self._machines.snapshot(ref, name)

    @BOUNDARY
    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        self._machines.revert(ref, snapshot, self.config.ip_timeout)

    def console_log(self, ref: MachineRef) -> str:
        return self._machines.console_log(ref)

    @BOUNDARY
    def destroy(self, ref: MachineRef) -> None:
        self._machines.destroy(ref)

    @BOUNDARY
    def keep(self, ref: MachineRef) -> None:
        self._machines.keep(ref)

    @BOUNDARY
    def remove_template(self, snapshot: Snapshot) -> None:
        self._templates.remove(snapshot)

    @BOUNDARY
    def owned(self, session_id: str | None = None) -> Iterable[MachineRef]:
        return self._machines.owned(session_id)

    # -- optional protocols -------------------------------------------------------------------
    @BOUNDARY
    def templates(self) -> list[Snapshot]:
        """Templates this backend built (complete ones), for ``vmenv images`` and the sweep."""
        return self._templates.listed()

    @BOUNDARY
    def end_session(self, session_id: str) -> None:
        """Remove the session's folder ``vmenv-<session_id>`` once it is empty (last one out).

        Called by the core when no process of the session is left (its last xdist worker at
        exit, or a sweep of a dead session); a folder that still holds a VM is left alone.
        """
        self._layout.remove_folder(f"vmenv-{session_id}")

    def shell(self, ref: MachineRef, argv: Sequence[str]) -> int:
        """An interactive ``ssh`` into the machine (``vmenv shell``); its exit status."""
        host, port = self.guest_endpoint(ref)
        command = ["ssh", "-p", str(port), "-o", "StrictHostKeyChecking=no"]
        if self.config.ssh_key:
            command += ["-i", self.config.ssh_key]
        command += [f"{self.config.ssh_user}@{host}", *(argv or ())]
        return subprocess.call(command)

    def close(self) -> None:
        """Close SSH connections and drop this object's use of the shared login."""
        self._channels.close()
        self._link.close()
