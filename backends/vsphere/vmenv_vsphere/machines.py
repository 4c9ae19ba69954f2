"""The machines: linked clones of a snapshot, their snapshots, reverts, labels and removal.

A clone is a linked clone (``createNewChildDiskBacking``) of a snapshot into the session's
folder (``vmenv-<session id>``), labelled (see :mod:`.inventory`), resized, powered on and
ready (:meth:`.channels.Channels.ready`). A clone with ``isolation="revert"`` gets a snapshot
before its first boot, which is what reverting it to its template means. Snapshots are taken
without memory, so a revert powers the VM back on from the snapshot's disk.

A snapshot's ``handle`` is ``VM-MOREF/SNAPSHOT-MOREF``; a machine's ``id`` is its VM's
managed object id, so every method works from any process on a ref from :meth:`owned`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pyVmomi import vim

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef, Network, Session, Snapshot

from . import inventory, vms
from .channels import Channels
from .connection import Link
from .faults import NAME
from .layout import Layout

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["Machines", "handle"]


def handle(vm: Any, snap: Any) -> str:
    """A snapshot's ``handle``: the VM's and the snapshot's managed object ids."""
    return f"{vm._moId}/{snap._moId}"


class Machines:
    """Clones and what is done to them (thread-safe); see the module docstring."""

    def __init__(self, link: Link, layout: Layout, channels: Channels) -> None:
        self._link = link
        self._layout = layout
        self._channels = channels
        self._lock = threading.Lock()
        self._hardware: dict[str, tuple[int, int]] = {}

    def vm(self, moref: str) -> Any:
        """The VM ``moref`` (no round trip)."""
        return vms.vm_by_id(self._link.conn, moref)

    def split(self, snapshot: Snapshot) -> tuple[Any, Any]:
        """The VM and the snapshot of a snapshot's ``handle``."""
        vm_id, _, snap_id = snapshot.handle.partition("/")
        return self.vm(vm_id), vim.vm.Snapshot(snap_id, self._link.conn.stub)

    def create(
        self, spec: MachineSpec, session: Session, base: tuple[Any, Any], folder: Any,
        **labels: str,
    ) -> Any:  # fmt: skip
        """A powered-off linked clone of ``base`` (VM, snapshot) into ``folder``, resized."""
        source, snap = base
        extra = {str(k): str(v) for k, v in dict(spec.image_config.get("extra_config", {})).items()}
        all_labels = {**extra, **inventory.labels(session, spec.name, source, **labels)}
        network = spec.network or self._link.config.network
        place = replace(self._layout.place, folder=folder)
        vm = self._link.call(
            lambda: vms.clone_vm(
                self._link.conn, source, snap, f"{spec.name}-{uuid.uuid4().hex[:8]}", place,
                labels=all_labels,
                annotation=f"Made by pytest-vmenv for machine {spec.name!r} of session "
                f"{session.id}; `vmenv gc` removes it once that session is gone.",
                network=network, instant=bool(spec.image_config.get("instant")),
            )
        )  # fmt: skip
        try:
            self._resize(vm, source, spec)
        except BaseException:
            self.discard(vm, spec.name, session.id)
            raise
        return vm

    def _resize(self, vm: Any, source: Any, spec: MachineSpec) -> None:
        """Apply ``cpus``/``memory`` with a reconfigure (skipped when the source matches)."""
        conn = self._link.conn
        with self._lock:
            have = self._hardware.get(source._moId)
        if have is None:
            hw = self._link.call(lambda: vms.props(conn, source, ["config.hardware"]))
            have = (int(hw["config.hardware"].numCPU), int(hw["config.hardware"].memoryMB))
            with self._lock:
                self._hardware[source._moId] = have
        memory_mb = max(spec.memory // 2**20, 4)
        self._link.call(lambda: vms.resize(conn, vm, have, spec.cpus, memory_mb))

    def take(self, vm: Any, name: str, description: str, what: str) -> Any:
        """A disk-only snapshot of ``vm`` (see :func:`.vms.snapshot`)."""
        return self._link.call(lambda: vms.snapshot(self._link.conn, vm, name, description, what))

    def start(self, vm: Any, ref: MachineRef, timeout: float) -> MachineRef:
        """Power ``vm`` on; ``ref`` with its IP once it is ready."""
        self._link.call(lambda: vms.power_on(self._link.conn, vm, ref.name))
        return self._channels.ready(ref, vm, timeout)

    def power_off(self, vm: Any, name: str) -> None:
        """Power ``vm`` off (hard); already off is fine."""
        self._link.call(lambda: vms.power_off(self._link.conn, vm, name))

    def discard(self, vm: Any, name: str, session: str | None) -> None:
        """Remove ``vm`` (only if it carries ``session``, when given); gone is success."""
        self._channels.drop(vm._moId)
        self._link.call(lambda: vms.destroy_vm(self._link.conn, vm, name, session))

    def clone(
        self, snapshot: Snapshot, spec: MachineSpec, session: Session, network: Network | None
    ) -> MachineRef:
        """A running, ready linked clone of ``snapshot`` (see the module docstring).

        ``network`` is not a segment of its own here: ``spec.network`` names the port group
        (capabilities say ``network=False``), shared by every machine that names it."""
        source, snap = self.split(snapshot)
        folder = self._layout.folder(f"vmenv-{session.id}")
        vm = self.create(spec, session, (source, snap), folder)
        data: dict[str, Any] = {"parent": source._moId}
        ref = MachineRef(NAME, vm._moId, spec.name, session.id, data=data, owner=session.owner,
                         created=time.time())  # fmt: skip
        try:
            if spec.isolation == "revert":
                base = self.take(vm, inventory.BASE_SNAPSHOT, "clone base", spec.name)
                data["base_snapshot"] = base._moId
            return self.start(vm, ref, spec.timeout)
        except BaseException:
            self.discard(vm, spec.name, session.id)
            raise

    def destroy(self, ref: MachineRef) -> None:
        """Remove the machine; already gone is success."""
        self._channels.forget(ref.id)
        with contextlib.suppress(errors.MachineGone):
            self.discard(self.vm(ref.id), ref.name, ref.session)

    def label(self, vm: Any, values: dict[str, str], what: str) -> None:
        """Add ``values`` (without :data:`.inventory.PREFIX`) to ``vm``'s labels."""
        labels = {inventory.PREFIX + k: v for k, v in values.items()}
        change = vim.vm.ConfigSpec(extraConfig=inventory.extra_config(labels))
        self._link.call(lambda: self._link.wait(vm.ReconfigVM_Task(change), what))

    def keep(self, ref: MachineRef) -> None:
        """Label the machine kept: sweeps leave it until ``destroy``."""
        self.label(self.vm(ref.id), {"kept": "1"}, f"keep {ref.name}")

    def owned(self, session_id: str | None = None) -> list[MachineRef]:
        """The machines with our labels (not templates), of ``session_id`` only if given."""
        refs = []
        for lab in self._layout.labelled():
            labels = lab.labels
            if "template" in labels or (session_id is not None and labels["session"] != session_id):
                continue
            refs.append(MachineRef(
                NAME, lab.vm._moId, labels.get("name", lab.name), labels["session"], ip=lab.ip,
                data={"vm_name": lab.name, "parent": labels.get("parent", "")},
                owner=labels.get("owner", ""), created=float(labels.get("created", 0)),
                kept=labels.get("kept") == "1",
            ))  # fmt: skip
        return refs

    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        vm = self.vm(ref.id)
        snap = self.take(vm, name, "pytest-vmenv vm.snapshot()", ref.name)
        return Snapshot(NAME, name, handle(vm, snap), "", {"vm": ref.id})

    def revert(self, ref: MachineRef, snapshot: Snapshot, timeout: float) -> None:
        """Back to one of the machine's snapshots, or to its template's (``isolation="revert"``)."""
        vm_id, _, snap_id = snapshot.handle.partition("/")
        if vm_id != ref.id:
            snap_id = str(ref.data.get("base_snapshot") or "")
            if not snapshot.key or not snap_id:
                raise errors.BackendError(
                    f"{NAME}: {ref.name!r} can only revert to its own snapshots; reverting to "
                    "its template needs isolation='revert' (a base snapshot taken at clone time)"
                )
        vm = self.vm(ref.id)
        target = vim.vm.Snapshot(snap_id, self._link.conn.stub)
        self._channels.drop(ref.id)
        self._link.call(
            lambda: self._link.wait(target.RevertToSnapshot_Task(), f"revert {ref.name}")
        )
        self.start(vm, replace(ref, ip=None), timeout)

    def console_log(self, ref: MachineRef) -> str:
        """The machine's recent vCenter events (vSphere has no console log to read)."""
        return vms.events(self._link.conn, self.vm(ref.id))
