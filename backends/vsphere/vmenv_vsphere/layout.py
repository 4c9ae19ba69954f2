"""Where one backend object's VMs go and come from, resolved once and cached.

The configured placement (datacenter, folder, pool, datastore), the session and template
folders under it (made on first use by whichever worker comes first, removed by the last one
out), and each image's template VM and snapshot.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from pyVmomi import vim

from pytest_vmenv.errors import ConfigError

from . import inventory, vms
from .connection import Link

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["Layout"]


class Layout:
    """Where this backend object's VMs go and come from (thread-safe, cached per object)."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._lock = threading.Lock()
        self._place: inventory.Placement | None = None
        self._folders: dict[str, Any] = {}

    @property
    def place(self) -> inventory.Placement:
        """The configured placement, resolved on first use."""
        with self._lock:
            if self._place is None:
                link = self._link
                place = link.call(lambda: inventory.placement(link.conn.content, link.config))
                self._place = place
            return self._place

    def labelled(self) -> list[inventory.Labelled]:
        """Every VM that carries our labels (see :func:`.inventory.labelled`)."""
        return self._link.call(lambda: list(inventory.labelled(self._link.conn.content)))

    def folder(self, name: str) -> Any:
        """The folder ``name`` under the configured one, made if missing (by any worker)."""
        with self._lock:
            if name in self._folders:
                return self._folders[name]
        parent = self.place.folder

        def find_or_make() -> Any:
            for child in parent.childEntity:
                if isinstance(child, vim.Folder) and child.name == name:
                    return child
            try:
                return parent.CreateFolder(name)
            except vim.fault.DuplicateName:  # another worker made it first
                return next(c for c in parent.childEntity if c.name == name)

        folder = self._link.call(find_or_make)
        with self._lock:
            self._folders[name] = folder
        return folder

    def remove_folder(self, name: str) -> None:
        """Remove the folder ``name`` if it is empty; one that still holds a VM is left."""
        parent = self.place.folder

        def remove() -> None:
            for child in parent.childEntity:
                if isinstance(child, vim.Folder) and child.name == name:
                    if not child.childEntity:
                        self._link.wait(child.Destroy_Task(), f"remove folder {name}")
                    return

        self._link.call(remove)
        with self._lock:
            self._folders.pop(name, None)

    def base(self, spec: MachineSpec) -> tuple[Any, Any]:
        """The image's template VM and snapshot (made if missing and ``create_snapshot``)."""
        ic = spec.image_config
        template = ic.get("template")
        if not isinstance(template, str) or not template:
            raise ConfigError(
                f'image {spec.image!r}: its vsphere entry needs template = "VM NAME", e.g. '
                '{ template = "debian-12", snapshot = "clean" }'
            )
        snap_name = str(ic.get("snapshot") or inventory.BASE_SNAPSHOT)
        conn = self._link.conn

        def find() -> tuple[Any, Any]:
            vm = inventory.find_vm(conn.content, self.place.datacenter, template)
            if vm is None:
                raise ConfigError(f"image {spec.image!r}: no VM or template named {template!r}")
            tree = vms.props(conn, vm, ["snapshot"]).get("snapshot")
            snap = inventory.find_snapshot(tree.rootSnapshotList if tree else (), snap_name)
            if snap is None:
                if not ic.get("create_snapshot"):
                    raise ConfigError(
                        f"image {spec.image!r}: {template!r} has no snapshot {snap_name!r}; take "
                        "one (linked clones need it), or set create_snapshot = true"
                    )
                task = vm.CreateSnapshot_Task(snap_name, "made by pytest-vmenv", False, False)
                snap = conn.wait(task, f"snapshot {template}")
            return vm, snap

        return self._link.call(find)
