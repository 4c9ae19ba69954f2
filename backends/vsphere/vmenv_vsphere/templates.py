"""Templates: an image's own snapshot, or a provisioned clone of it frozen for a key.

An image without provision steps is its template VM's snapshot as it is (never ours to
delete). With provision steps, ``build`` clones the image into ``vmenv-templates``, runs the
steps, powers off, snapshots, and labels the VM as the template for its key (``.template``,
``.reuse``, then ``.complete`` last, so a half-built one is never reused). Any process finds
it again by its labels: that is how xdist workers and ``--vm-reuse`` share templates.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef, Session, Snapshot
from pytest_vmenv.diagnose import provision_failed

from .channels import Channels
from .faults import NAME
from .layout import Layout
from .machines import Machines, handle

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["Templates"]

_TEMPLATE_SNAPSHOT = "vmenv-template"


class Templates:
    """Builds, finds and removes templates (see the module docstring)."""

    def __init__(self, layout: Layout, machines: Machines, channels: Channels) -> None:
        self._layout = layout
        self._machines = machines
        self._channels = channels

    def listed(self) -> list[Snapshot]:
        """The complete templates this backend built, from any session."""
        out = []
        for lab in self._layout.labelled():
            labels = lab.labels
            if labels.get("complete") != "1" or "template" not in labels:
                continue
            session, owner = labels["session"], labels.get("owner", "")
            created, reuse = float(labels.get("created", 0)), labels.get("reuse") == "1"
            data = {"session": session, "owner": owner, "created": created, "reuse": reuse}
            out.append(Snapshot(
                NAME, lab.name, f"{lab.vm._moId}/{labels['snapshot']}", labels["template"], data,
                session=session, owner=owner, created=created, reuse=reuse, complete=True,
            ))  # fmt: skip
        return out

    def build(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        """The template for ``key``: found, or built (see the module docstring)."""
        source, snap = self._layout.base(spec)
        if not spec.provision:
            return Snapshot(NAME, spec.name, handle(source, snap), key, {"base": True})
        found = next((t for t in self.listed() if t.key == key), None)
        if found is not None:
            return found
        start = time.monotonic()
        folder = self._layout.folder("vmenv-templates")
        reuse = "1" if session.reuse else "0"
        vm = self._machines.create(spec, session, (source, snap), folder, template=key, reuse=reuse)
        try:
            ref = MachineRef(NAME, vm._moId, spec.name, session.id, owner=session.owner)
            ref = self._machines.start(vm, ref, spec.timeout)
            self._provision(ref, spec, start)
            self._channels.drop(ref.id)
            self._machines.power_off(vm, spec.name)
            tsnap = self._machines.take(vm, _TEMPLATE_SNAPSHOT, f"template {key}", spec.name)
            done = {"snapshot": tsnap._moId, "complete": "1"}
            self._machines.label(vm, done, "label template")
        except BaseException:
            self._machines.discard(vm, spec.name, session.id)
            raise
        created = time.time()
        data = {"session": session.id, "owner": session.owner, "created": created,
                "reuse": session.reuse}  # fmt: skip
        return Snapshot(
            NAME, spec.name, handle(vm, tsnap), key, data, session=session.id,
            owner=session.owner, created=created, reuse=session.reuse, complete=True,
        )  # fmt: skip

    def _provision(self, ref: MachineRef, spec: MachineSpec, start: float) -> None:
        """Run ``spec.provision`` in the template's machine, within ``spec.timeout`` in all."""
        for step in spec.provision:
            argv = ["/bin/sh", "-c", step] if isinstance(step, str) else list(step)
            left = max(spec.timeout - (time.monotonic() - start), 1.0)
            try:
                result = self._channels.execute(ref, argv, timeout=left)
            except errors.CommandTimeout as exc:
                raise errors.ProvisionError(f"{NAME}: template {spec.name}: {exc}") from None
            if not result.ok:  # the template's own network: outbound unknown
                raise provision_failed(
                    NAME, spec.name, step, result.exit_code,
                    result.stdout, result.stderr, outbound=None,
                )  # fmt: skip
        self._channels.execute(ref, ["sync"], timeout=60)

    def remove(self, snapshot: Snapshot) -> None:
        """Delete a template VM we built, unless a linked clone (a kept one, say) still reads
        its snapshot's disks: TemplateInUse names it, and a later sweep removes both."""
        if snapshot.data.get("base"):
            return  # the user's own template: never ours to delete
        vm, _ = self._machines.split(snapshot)
        holder = next((r for r in self._machines.owned() if r.data.get("parent") == vm._moId), None)
        if holder is not None:
            what = f"machine {holder.name} ({holder.id}) is a linked clone of it"
            raise errors.TemplateInUse(
                f"{NAME}: template {snapshot.key or snapshot.name} left in place: {what}", what
            )
        with contextlib.suppress(errors.MachineGone):
            self._machines.discard(vm, snapshot.name, None)
