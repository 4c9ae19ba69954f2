"""Machines: linked clones of a template, kept or destroyed.

Contract of :meth:`Machines.clone`: a new overlay volume on the template's disk plus its own
domain, on the URI with the most free memory. Fast path: the RAM-state overlay's bytes are
copied into the clone's volume (same backing file), the snapshot's metadata is redefined on
the new domain (own name, own uuid: a restore with another ``<uuid>`` is what libvirt
refuses, a redefined internal snapshot is not), and ``revertToSnapshot`` starts it running
(QEMU ``-loadvm``). Cold path (networked clones, a different cpus/memory, SSH images, or
``ram_state = false``): the overlay, booted.

:meth:`Machines.destroy` destroys and undefines the domain (with its snapshot metadata),
deletes its volume, its console log, and its environment's network once no machine is on
it. It works from any process, by the labels in the domain's ``<metadata>``; already gone
is success.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef, Network, Session, Snapshot

from .connection import NAME
from .domains import machine_labels, read_labels, set_labels
from .guests import Launch
from .parts import Parts

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["Machines"]


class Machines:
    """Clone, keep and destroy machines (see the module docstring); thread-safe."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.guests = parts.guests
        self.pool = parts.pool
        self.paths = parts.paths

    def _fast(self, record: Mapping[str, Any], spec: MachineSpec, on_network: bool) -> bool:
        """Whether a clone of ``spec`` may start from the template's RAM state."""
        return (
            bool(record.get("ram"))
            and self.parts.config.ram_state
            and not on_network
            and record.get("memory") == spec.memory
            and record.get("cpus") == spec.cpus
            and Path(str(record["ram"])).exists()
        )

    def clone(
        self, snapshot: Snapshot, spec: MachineSpec, session: Session, network: Network | None
    ) -> MachineRef:
        record = self.parts.records.require(snapshot)
        ssh = record["boot"].get("ssh") or None
        if ssh and network is None:
            raise errors.ConfigError(
                f"{NAME}: machine {spec.name!r}: its image has no guest agent, so commands go "
                'over SSH, which needs an address: give it a network (network="lan")'
            )
        uri = self.parts.inventory.roomiest()
        dom = f"vmenv-{spec.name}-{uuid.uuid4().hex[:8]}"
        fast = self._fast(record, spec, network is not None)
        net = self.parts.networks.ensure(network, session.id) if network else None
        disk = self.pool.path / f"{dom}.qcow2"
        labels = machine_labels(
            session, self.paths.state_dir, spec.name, "clone", template=snapshot.key, disk=disk,
            console=self.paths.console(dom), network=net, uri=uri, ram="1" if fast else "",
            channel="ssh" if ssh else "", ssh_user=ssh["user"] if ssh else "",
            ssh_key=ssh["key"] if ssh else "", ssh_port=ssh["port"] if ssh else "",
        )  # fmt: skip
        try:
            self.pool.create_overlay(disk.name, Path(str(record["disk"])), spec.disk)
            if fast:
                shutil.copyfile(str(record["ram"]), disk)
            self.guests.start(Launch(dom, labels, record["boot"], disk, spec.memory, spec.cpus,
                                     net, uri, restore=fast))  # fmt: skip
            ip = self.guests.ready(dom, spec.name, spec.timeout, uri, net, fast, ssh,
                                   bool(record["boot"].get("systemd")))  # fmt: skip
        except BaseException:
            self.destroy_domain(dom, uri)
            raise
        return MachineRef(
            backend=NAME,
            id=dom,
            name=spec.name,
            session=session.id,
            ip=ip,
            data={
                "uri": uri,
                "template": snapshot.key,
                "fast": fast,
                **({"ssh": ssh} if ssh else {}),
            },
            owner=session.owner,
            created=float(str(labels["created"])),
        )

    def destroy_domain(self, dom: str, uri: str | None = None) -> None:
        """Remove ``dom`` and what it owns (from any process); already gone is success."""
        labels: dict[str, str] | None = None
        self.parts.channels.forget(dom)
        for target in [uri] if uri else self.parts.config.uris:
            labels = self.guests.stop(dom, target)
            if labels is not None:
                break
        labels = labels or {}
        self.pool.delete(Path(labels.get("disk") or self.pool.path / f"{dom}.qcow2"))
        Path(labels.get("console") or self.paths.console(dom)).unlink(missing_ok=True)
        if labels.get("network"):
            self.parts.networks.release(labels["network"])

    def destroy(self, ref: MachineRef) -> None:
        self.destroy_domain(ref.id, ref.data.get("uri"))

    def keep(self, ref: MachineRef) -> None:
        """Mark the machine kept (its domain is persistent: it outlives us anyway)."""

        def mark(conn: libvirt.virConnect) -> None:
            domain = conn.lookupByName(ref.id)
            labels = read_labels(domain) or {}
            labels["kept"] = "1"
            set_labels(domain, labels)

        self.parts.hv.call(mark, ref.data.get("uri"))
