"""Placement and inventory: which host a new clone goes to, and every domain of ours.

Contract: :class:`Inventory` reads the labels in each domain's ``<metadata>`` on every URI,
so it works from any process with no record but libvirt's: :meth:`Inventory.owned` lists our
machines, :meth:`Inventory.built_on` says which clone a template's disk backs. "Ours" is the
machines of one state dir (label ``state``): a libvirtd is shared by every user and checkout
of a host, and a sweep or ``vmenv gc --all`` of one state dir must never destroy another's
kept machines (domains without the label, from before it existed, count as ours). A list of URIs
is the scale-out path: :meth:`Inventory.roomiest` picks the host with the most free memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef

from .config import Paths
from .connection import NAME, Hypervisor
from .domains import read_labels
from .remote import ssh_of

__all__ = ["Inventory"]


class Inventory:
    """The domains of ours on ``uris`` (see the module docstring)."""

    def __init__(self, hv: Hypervisor, uris: Sequence[str], paths: Paths) -> None:
        self.hv = hv
        self.uris = list(uris)
        self.paths = paths

    def roomiest(self) -> str:
        """The URI with the most free memory (the first one if there is only one)."""
        if len(self.uris) == 1:
            return self.uris[0]
        return max(self.uris, key=lambda u: self.hv.call(lambda c: c.getFreeMemory(), u))

    def _domains(self, uri: str, why: str) -> list[Any]:
        try:
            return list(self.hv.call(lambda c: c.listAllDomains(0), uri))
        except libvirt.libvirtError as exc:
            raise errors.BackendError(f"{NAME}: {why} (listing the domains on {uri} failed: "
                                      f"{exc})") from exc  # fmt: skip

    def owned(self, session_id: str | None = None) -> list[MachineRef]:
        """Every domain with our labels (of ``session_id`` only, if given), any role or state."""
        refs = []
        state = str(self.paths.state_dir.resolve())
        for uri in self.uris:
            for domain in self._domains(uri, f"cannot list the machines on {uri}"):
                labels = read_labels(domain)
                if labels is None or session_id not in (None, labels.get("session")):
                    continue
                if labels.get("state", state) != state:
                    continue
                try:
                    active = bool(domain.isActive())
                except libvirt.libvirtError:
                    continue
                refs.append(_ref(domain.name(), uri, labels, active))
        return refs

    def built_on(self, key: str) -> str:
        """Which clone (kept or not, running or stopped, on any URI) has a disk backed by
        template ``key``, as a phrase for :class:`~pytest_vmenv.errors.TemplateInUse`; '' if
        none.

        A clone's qcow2 overlay (and a fast clone's copy of the RAM-state overlay) reads the
        template's disk as its backing file: deleting it breaks the clone at its next start.
        """
        for uri in self.uris:
            why = (
                f"cannot tell whether a machine on {uri} is built on template {key}; the "
                "template is left for a later sweep"
            )
            for domain in self._domains(uri, why):
                labels = read_labels(domain)
                if labels and labels.get("role") == "clone" and labels.get("template") == key:
                    name = labels.get("name") or domain.name()
                    return f"machine {name} ({domain.name()}) on {uri} is built on it"
        return ""


def _ref(dom: str, uri: str, labels: dict[str, str], active: bool) -> MachineRef:
    ssh = ssh_of(labels)
    return MachineRef(
        backend=NAME,
        id=dom,
        name=labels.get("name", dom),
        session=labels.get("session", ""),
        ip=labels.get("ip") or None,
        data={
            "uri": uri,
            "role": labels.get("role", ""),
            "state": "running" if active else "stopped",
            **({"ssh": ssh} if ssh else {}),
        },
        owner=labels.get("owner", ""),
        created=float(labels.get("created") or 0),
        kept=labels.get("kept") == "1",
    )
