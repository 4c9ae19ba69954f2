"""Inventory: every domain of ours on every URI, from the labels in its ``<metadata>``,
and which of them a template's disk backs.

Split from :mod:`.backend` to keep it short; works from any process (no record but libvirt's).
"""

from __future__ import annotations

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef

from .connection import NAME, Hypervisor
from .domains import read_labels
from .remote import ssh_of

__all__ = ["built_on", "owned_refs"]


def owned_refs(hv: Hypervisor, uris: list[str], session: str | None) -> list[MachineRef]:
    """Every domain with our labels (of ``session`` only, if given), any role or state."""
    refs = []
    for uri in uris:
        try:
            domains = hv.call(lambda c: c.listAllDomains(0), uri)
        except libvirt.libvirtError as exc:
            raise errors.BackendError(f"{NAME}: cannot list domains on {uri}: {exc}") from exc
        for domain in domains:
            labels = read_labels(domain)
            if labels is None or (session is not None and labels.get("session") != session):
                continue
            try:
                active = bool(domain.isActive())
            except libvirt.libvirtError:
                continue
            refs.append(
                MachineRef(
                    backend=NAME,
                    id=domain.name(),
                    name=labels.get("name", domain.name()),
                    session=labels.get("session", ""),
                    ip=labels.get("ip") or None,
                    data={
                        "uri": uri,
                        "role": labels.get("role", ""),
                        "state": "running" if active else "stopped",
                        **({"ssh": ssh} if (ssh := ssh_of(labels)) else {}),
                    },
                    owner=labels.get("owner", ""),
                    created=float(labels.get("created") or 0),
                    kept=labels.get("kept") == "1",
                )
            )
    return refs


def built_on(hv: Hypervisor, uris: list[str], key: str) -> str:
    """Which clone (kept or not, running or stopped, on any URI) has a disk backed by
    template ``key``, as a phrase for :class:`~pytest_vmenv.errors.TemplateInUse`; '' if none.

    A clone's qcow2 overlay (and a fast clone's copy of the RAM-state overlay) reads the
    template's disk as its backing file: deleting it breaks the clone at its next start.
    """
    for uri in uris:
        try:
            domains = hv.call(lambda c: c.listAllDomains(0), uri)
        except libvirt.libvirtError as exc:
            raise errors.BackendError(
                f"{NAME}: cannot tell whether a machine on {uri} is built on template {key} "
                f"(listing its domains failed: {exc}); the template is left for a later sweep"
            ) from exc
        for domain in domains:
            labels = read_labels(domain)
            if labels and labels.get("role") == "clone" and labels.get("template") == key:
                name = labels.get("name") or domain.name()
                return f"machine {name} ({domain.name()}) on {uri} is built on it"
    return ""
