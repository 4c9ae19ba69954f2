"""VsphereBackend: linked clones from a template snapshot on vCenter/ESXi, through pyvmomi.

Images are templates (``{ template = "debian-12", snapshot = "clean" }``); a clone is a linked
clone of that snapshot (``createNewChildDiskBacking``) into the session's folder
(``vmenv-<session id>``), labelled (see :mod:`.inventory`), powered on, and ready once VMware
Tools reports its IP and SSH answers there. ``build_template`` with provision steps clones the
image, runs the steps, powers off, snapshots, and labels the VM as the template for its key,
reusable across sessions. Commands and files go over the core's SSH channel
(:mod:`pytest_vmenv.ssh`) to the guest's IP when SSH is configured, else through VMware Tools
guest operations (:mod:`.guestops`, with ``guest_user``/``guest_password``).

Every method that takes a :class:`MachineRef` works from any process on a ref from
:meth:`owned` (the ref's ``id`` is the VM's managed object id), which is how ``vmenv gc`` and
the crash sweeper remove what dead sessions left. Foreign exceptions (``vmodl.MethodFault``,
``OSError``) are mapped to :mod:`pytest_vmenv.errors` by :func:`boundary`.

``live_snapshot`` is False: snapshots are taken without memory, so a revert powers the VM
back on from the snapshot's disk. ``network`` maps a spec's network name to a port group;
it is not a private segment per environment, so the ``network`` capability is False.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyVmomi import vim, vmodl

from pytest_vmenv import errors
from pytest_vmenv.backend import (
    GET_LIMIT,
    OUTPUT_LIMIT,
    Capabilities,
    MachineRef,
    Result,
    Session,
    Snapshot,
)
from pytest_vmenv.diagnose import provision_failed

from . import inventory, vms
from .base import NAME, VsphereBase, _handle, boundary
from .connection import fault_message, release, unreachable

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["VsphereBackend"]

_TEMPLATE_SNAPSHOT = "vmenv-template"
_BASE_SNAPSHOT = "vmenv-base"


class VsphereBackend(VsphereBase):
    """The ``vsphere`` backend (see the module docstring); thread-safe."""

    builtin_images: tuple[str, ...] = ()

    @boundary
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
        from pytest_vmenv.ssh import SSHUnreachable

        try:
            return self._channel(ref).execute(
                argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
            )
        except SSHUnreachable:
            if not self._exists(ref):
                raise errors.MachineGone(
                    f"{NAME}: machine {ref.name!r} ({ref.id}) is gone"
                ) from None
            raise

    @boundary
    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        self._channel(ref).copy_in(Path(src), dst)

    @boundary
    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        self._channel(ref).copy_out(src, Path(dst), max_size=max_size)

    # -- protocol -----------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities(live_snapshot=False, network=False, limits=True, console_log=False)

    def check(self) -> None:
        try:
            self._call(lambda: self.conn.content.about.fullName)
            _ = self.place
        except vmodl.MethodFault as exc:
            raise errors.BackendUnavailable(NAME, fault_message(exc)) from None
        except OSError as exc:
            raise errors.BackendUnavailable(NAME, unreachable(self.config, exc)) from None

    def templates(self) -> list[Snapshot]:
        """Templates this backend built (complete ones), for ``vmenv images`` and the sweep."""
        out = []
        for lab in self._call(lambda: list(inventory.labelled(self.conn.content))):
            labels = lab.labels
            if labels.get("complete") != "1" or "template" not in labels:
                continue
            data = {
                "session": labels["session"], "owner": labels.get("owner", ""),
                "created": float(labels.get("created", 0)), "reuse": labels.get("reuse") == "1",
            }  # fmt: skip
            out.append(Snapshot(NAME, lab.name, f"{lab.vm._moId}/{labels['snapshot']}",
                                labels["template"], data))  # fmt: skip
        return out

    @boundary
    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        source, snap = self._base(spec)
        if not spec.provision:
            return Snapshot(NAME, spec.name, _handle(source, snap), key, {"base": True})
        found = next((t for t in self.templates() if t.key == key), None)
        if found is not None:
            return found
        start = time.monotonic()
        folder = self._folder("vmenv-templates")
        reuse = "1" if session.reuse else "0"
        vm = self._new_vm(spec, session, source, snap, folder, False, template=key, reuse=reuse)
        try:
            self._resize(vm, source, spec)
            self._call(lambda: vms.power_on(self.conn, vm, spec.name))
            ref = MachineRef(NAME, vm._moId, spec.name, session.id, owner=session.owner)
            ref = self._ready(ref, vm, spec.timeout)
            for step in spec.provision:
                argv = ["/bin/sh", "-c", step] if isinstance(step, str) else list(step)
                left = max(spec.timeout - (time.monotonic() - start), 1.0)
                try:
                    result = self.execute(ref, argv, timeout=left)
                except errors.CommandTimeout as exc:
                    raise errors.ProvisionError(f"{NAME}: template {spec.name}: {exc}") from None
                if not result.ok:  # the template's own network: outbound unknown
                    raise provision_failed(
                        NAME, spec.name, step, result.exit_code,
                        result.stdout, result.stderr, outbound=None,
                    )  # fmt: skip
            self.execute(ref, ["sync"], timeout=60)
            self._drop_channel(ref.id)
            self._call(lambda: vms.power_off(self.conn, vm, spec.name))
            tsnap = self._take(vm, _TEMPLATE_SNAPSHOT, f"template {key}", spec.name)
            done = {inventory.PREFIX + "snapshot": tsnap._moId, inventory.PREFIX + "complete": "1"}
            spec_change = vim.vm.ConfigSpec(extraConfig=inventory.extra_config(done))
            self._call(lambda: self.conn.wait(vm.ReconfigVM_Task(spec_change), "label template"))
        except BaseException:
            self._drop_channel(vm._moId)
            self._call(lambda: vms.destroy_vm(self.conn, vm, spec.name, session.id))
            raise
        data = {"session": session.id, "owner": session.owner, "created": time.time(),
                "reuse": session.reuse}  # fmt: skip
        return Snapshot(NAME, spec.name, _handle(vm, tsnap), key, data)

    @boundary
    def remove_template(self, snapshot: Snapshot) -> None:
        """Delete a template VM we built, unless a linked clone (a kept one, say) still reads
        its snapshot's disks: TemplateInUse names it, and a later sweep removes both."""
        if snapshot.data.get("base"):
            return  # the user's own template: never ours to delete
        vm, _ = self._split(snapshot)
        child = next((r for r in self.owned(None) if r.data.get("parent") == vm._moId), None)
        if child is not None:
            holder = f"machine {child.name} ({child.id}) is a linked clone of it"
            raise errors.TemplateInUse(
                f"{NAME}: template {snapshot.key or snapshot.name} left in place: {holder}", holder
            )
        self._drop_channel(vm._moId)
        with contextlib.suppress(errors.MachineGone):
            self._call(lambda: vms.destroy_vm(self.conn, vm, snapshot.name, None))

    @boundary
    def end_session(self, session: str) -> None:
        """Remove the session's folder ``vmenv-<session>`` once it is empty (last one out).

        Called by the core when no process of the session is left (its last xdist worker at
        exit, or a sweep of a dead session); a folder that still holds a VM is left alone.
        """
        name = f"vmenv-{session}"
        parent = self.place.folder

        def remove() -> None:
            for child in parent.childEntity:
                if isinstance(child, vim.Folder) and child.name == name:
                    if not child.childEntity:
                        self.conn.wait(child.Destroy_Task(), f"remove folder {name}")
                    return

        self._call(remove)
        with self._lock:
            self._folders.pop(name, None)

    @boundary
    def clone(self, snapshot: Snapshot, spec: MachineSpec, session: Session) -> MachineRef:
        source, snap = self._split(snapshot)
        folder = self._folder(f"vmenv-{session.id}")
        revertible = spec.isolation == "revert"
        vm = self._new_vm(spec, session, source, snap, folder, False)
        data: dict[str, Any] = {"parent": source._moId}
        ref = MachineRef(NAME, vm._moId, spec.name, session.id, data=data, owner=session.owner,
                         created=time.time())  # fmt: skip
        try:
            self._resize(vm, source, spec)
            if revertible:  # a snapshot before first boot: what "revert to the template" means
                base = self._take(vm, _BASE_SNAPSHOT, "clone base", spec.name)
                data["base_snapshot"] = base._moId
            self._call(lambda: vms.power_on(self.conn, vm, spec.name))
            return self._ready(ref, vm, spec.timeout)
        except BaseException:
            self._drop_channel(vm._moId)
            self._call(lambda: vms.destroy_vm(self.conn, vm, spec.name, session.id))
            raise

    @boundary
    def destroy(self, ref: MachineRef) -> None:
        self._gone.add(ref.id)
        self._drop_channel(ref.id)
        with contextlib.suppress(errors.MachineGone):
            self._call(lambda: vms.destroy_vm(self.conn, self._vm(ref.id), ref.name, ref.session))

    @boundary
    def keep(self, ref: MachineRef) -> None:
        change = vim.vm.ConfigSpec(
            extraConfig=inventory.extra_config({inventory.PREFIX + "kept": "1"})
        )
        self._call(
            lambda: self.conn.wait(self._vm(ref.id).ReconfigVM_Task(change), f"keep {ref.name}")
        )

    @boundary
    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        vm = self._vm(ref.id)
        snap = self._take(vm, name, "pytest-vmenv vm.snapshot()", ref.name)
        return Snapshot(NAME, name, _handle(vm, snap), "", {"vm": ref.id})

    @boundary
    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        vm_id, _, snap_id = snapshot.handle.partition("/")
        if vm_id != ref.id:
            snap_id = str(ref.data.get("base_snapshot") or "")
            if not snapshot.key or not snap_id:
                raise errors.BackendError(
                    f"{NAME}: {ref.name!r} can only revert to its own snapshots; reverting to "
                    "its template needs isolation='revert' (a base snapshot taken at clone time)"
                )
        vm = self._vm(ref.id)
        target = vim.vm.Snapshot(snap_id, self.conn.stub)
        self._drop_channel(ref.id)
        self._call(lambda: self.conn.wait(target.RevertToSnapshot_Task(), f"revert {ref.name}"))
        self._call(lambda: vms.power_on(self.conn, vm, ref.name))
        self._ready(replace(ref, ip=None), vm, self.config.ip_timeout)

    def console_log(self, ref: MachineRef) -> str:
        return self._events(self._vm(ref.id))

    @boundary
    def owned(self, session: str | None = None) -> Iterable[MachineRef]:
        refs = []
        for lab in self._call(lambda: list(inventory.labelled(self.conn.content))):
            labels = lab.labels
            if "template" in labels or (session is not None and labels["session"] != session):
                continue
            refs.append(MachineRef(
                NAME, lab.vm._moId, labels.get("name", lab.name), labels["session"], ip=lab.ip,
                data={"vm_name": lab.name, "parent": labels.get("parent", "")},
                owner=labels.get("owner", ""), created=float(labels.get("created", 0)),
                kept=labels.get("kept") == "1",
            ))  # fmt: skip
        return refs

    def shell(self, ref: MachineRef, command: Sequence[str] | None = None) -> int:
        """An interactive ``ssh`` into the machine (``vmenv shell``); its exit status."""
        host, port = self.guest_endpoint(ref)
        argv = ["ssh", "-p", str(port), "-o", "StrictHostKeyChecking=no"]
        if self.config.ssh_key:
            argv += ["-i", self.config.ssh_key]
        argv += [f"{self.config.ssh_user}@{host}", *(command or [])]
        return subprocess.call(argv)

    def close(self) -> None:
        """Close SSH connections and drop this object's use of the shared login."""
        for moref in list(self._channels):
            self._drop_channel(moref)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            release(conn)
