"""Snapshots: internal snapshots with RAM, and reverting a machine to one or to its template.

Contract: :meth:`Snapshots.take` is an internal snapshot with RAM of a running machine.
:meth:`Snapshots.revert` returns a machine to one of its own snapshots (running, with its
processes), or to the template it was cloned from: a revert to ``vmenv-ready`` for a fast
clone, a fresh overlay on the template and a boot for a cold one. An SSH machine's channel
is re-opened after a revert (the guest's TCP state is the snapshot's).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef, Snapshot

from .connection import NAME, is_gone
from .domains import READY_SNAPSHOT, REVERT_RUNNING, read_labels, snapshot_xml
from .parts import Parts

__all__ = ["Snapshots"]

_REVERT_TIMEOUT = 120.0
_REBOOT_TIMEOUT = 300.0


class Snapshots:
    """Take and revert to snapshots (see the module docstring); thread-safe."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.hv = parts.hv
        self.guests = parts.guests

    def take(self, ref: MachineRef, name: str) -> Snapshot:
        snap = f"{''.join(c if c.isalnum() else '-' for c in name)}-{uuid.uuid4().hex[:6]}"
        xml = snapshot_xml(snap)
        self.hv.call(
            lambda c: c.lookupByName(ref.id).snapshotCreateXML(xml, 0), ref.data.get("uri")
        )
        return Snapshot(
            backend=NAME,
            name=name,
            handle=f"{ref.id}/{snap}",
            data={"domain": ref.id, "snapshot": snap},
        )

    def _revert_to(self, ref: MachineRef, snap: str) -> None:
        self.hv.call(
            lambda c: c.lookupByName(ref.id).revertToSnapshot(
                c.lookupByName(ref.id).snapshotLookupByName(snap), REVERT_RUNNING
            ),
            ref.data.get("uri"),
        )

    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        uri = ref.data.get("uri")
        if snapshot.key:
            self._revert_to_template(ref, snapshot)
            return
        owner, _, snap = snapshot.handle.partition("/")
        if owner != ref.id:
            raise errors.BackendError(
                f"{NAME}: snapshot {snapshot.name!r} belongs to {owner}, not {ref.name!r}"
            )
        self._revert_to(ref, snap)
        if ref.data.get("ssh"):
            self.parts.channels.forget(ref.id)
            self.guests.ready(ref.id, ref.name, _REVERT_TIMEOUT, uri, None, False, ref.data["ssh"])
        else:
            self.parts.channels.wait_agent(ref.id, ref.name, _REVERT_TIMEOUT, uri)

    def _revert_to_template(self, ref: MachineRef, snapshot: Snapshot) -> None:
        uri = ref.data.get("uri")
        labels = self.hv.call(lambda c: read_labels(c.lookupByName(ref.id)), uri) or {}
        if labels.get("ram") == "1":
            self._revert_to(ref, READY_SNAPSHOT)
            self.guests.ready(ref.id, ref.name, _REVERT_TIMEOUT, uri, None, True)
            return
        record = self.parts.records.require(snapshot)
        pool = self.parts.pool
        disk = Path(labels.get("disk") or pool.path / f"{ref.id}.qcow2")

        def stop(conn: libvirt.virConnect) -> None:
            domain = conn.lookupByName(ref.id)
            try:
                domain.destroy()
            except libvirt.libvirtError as exc:
                if not is_gone(exc):
                    raise
            for snap in domain.listAllSnapshots(0):
                snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)

        self.hv.call(stop, uri)
        pool.delete(disk)
        pool.create_overlay(disk.name, Path(str(record["disk"])))
        self.hv.call(lambda c: c.lookupByName(ref.id).create(), uri)
        self.parts.channels.forget(ref.id)
        net = labels.get("network") or None
        self.guests.ready(ref.id, ref.name, _REBOOT_TIMEOUT, uri, net, False, ref.data.get("ssh"))
