"""Where things are in vCenter, and the labels that mark what pytest-vmenv made.

Every VM the backend creates carries, in ``extraConfig`` (readable by anyone with the
inventory, surviving the plugin's own records): ``guestinfo.vmenv.session``, ``.owner`` (the
owner token), ``.created``, ``.name`` (the machine name), ``.parent`` (the VM it was cloned
from), ``.kept`` once kept; templates also ``.template`` (the template key), ``.reuse`` and
``.complete`` (set last, so a half-built template is never reused). ``guestinfo.metadata``
holds ``{"local-hostname": NAME, "instance-id": ...}``, which cloud-init's VMware datasource
reads to name the guest. :func:`labelled` finds all of them with one PropertyCollector query
over a container view, however large the inventory.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from pytest_vmenv.backend import Session
from pytest_vmenv.errors import ConfigError

from .config import VsphereConfig

__all__ = [
    "BASE_SNAPSHOT",
    "PREFIX",
    "Labelled",
    "Placement",
    "extra_config",
    "labelled",
    "labels",
    "find_snapshot",
    "find_vm",
    "placement",
]

PREFIX = "guestinfo.vmenv."
BASE_SNAPSHOT = "vmenv-base"
"""The snapshot of an image's template when its config names none (and of a clone's base)."""
_PROPS = ["name", "config.extraConfig", "runtime.powerState", "guest.ipAddress"]


@dataclass(frozen=True)
class Labelled:
    """A VM that carries our labels, as one property query saw it."""

    vm: Any
    name: str
    labels: Mapping[str, str]
    power: str
    ip: str | None


def extra_config(values: Mapping[str, str]) -> list[Any]:
    """``extraConfig`` option values for a ConfigSpec."""
    return [vim.option.OptionValue(key=k, value=v) for k, v in values.items()]


def metadata(name: str, instance: str) -> str:
    """``guestinfo.metadata`` for cloud-init: the guest's hostname and instance id."""
    return json.dumps({"local-hostname": name, "instance-id": instance})


def labels(session: Session, name: str, parent: Any, **extra: str) -> dict[str, str]:
    """The ``extraConfig`` labels of a VM made for machine ``name`` from ``parent``."""
    values = {
        "session": session.id, "owner": session.owner, "created": f"{time.time():.3f}",
        "name": name, "parent": parent._moId, **extra,
    }  # fmt: skip
    out = {PREFIX + k: v for k, v in values.items()}
    out["guestinfo.metadata"] = metadata(name, uuid.uuid4().hex)
    return out


def labelled(content: Any) -> Iterator[Labelled]:
    """Every VM with a ``guestinfo.vmenv.session`` label, from one property query."""
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[
                vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        vmodl.query.PropertyCollector.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView
                        )
                    ],
                )
            ],
            propSet=[
                vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=_PROPS)
            ],
        )
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx(
            [spec], vmodl.query.PropertyCollector.RetrieveOptions()
        )
        while result is not None:
            for obj in result.objects:
                props = {p.name: p.val for p in obj.propSet}
                labels = {
                    o.key[len(PREFIX) :]: str(o.value)
                    for o in props.get("config.extraConfig") or ()
                    if o.key.startswith(PREFIX)
                }
                if "session" in labels:
                    yield Labelled(
                        obj.obj,
                        str(props.get("name", "")),
                        labels,
                        str(props.get("runtime.powerState", "")),
                        props.get("guest.ipAddress") or None,
                    )
            token = result.token
            result = collector.ContinueRetrievePropertiesEx(token) if token else None
    finally:
        view.Destroy()


@dataclass(frozen=True)
class Placement:
    """Where clones go: datacenter, VM folder, resource pool, datastore (None: the source's)."""

    datacenter: Any
    folder: Any
    pool: Any
    datastore: Any | None


def _child(content: Any, parent: Any, kind: type, name: str | None, what: str) -> Any:
    view = content.viewManager.CreateContainerView(parent, [kind], True)
    try:
        found = list(view.view)
    finally:
        view.Destroy()
    if name is None:
        if len(found) == 1:
            return found[0]
        names = ", ".join(sorted(o.name for o in found)) or "(none)"
        raise ConfigError(f"[tool.vmenv.backends.vsphere]: set {what}. Choose one of: {names}")
    for obj in found:
        if obj.name == name:
            return obj
    names = ", ".join(sorted(o.name for o in found)) or "(none)"
    raise ConfigError(
        f"[tool.vmenv.backends.vsphere]: {what} = {name!r} does not exist. Choose one of: {names}"
    )


def placement(content: Any, cfg: VsphereConfig) -> Placement:
    """Resolve the configured datacenter, folder, cluster/pool and datastore once."""
    dc = _child(content, content.rootFolder, vim.Datacenter, cfg.datacenter, "datacenter")
    folder = dc.vmFolder
    for part in (cfg.folder or "").strip("/").split("/"):
        if part:
            folder = next(
                (c for c in folder.childEntity if isinstance(c, vim.Folder) and c.name == part),
                None,
            ) or _missing_folder(cfg.folder)
    if cfg.resource_pool:
        pool = _child(content, dc.hostFolder, vim.ResourcePool, cfg.resource_pool, "resource_pool")
    else:
        cluster = _child(content, dc.hostFolder, vim.ClusterComputeResource, cfg.cluster, "cluster")
        pool = cluster.resourcePool
    datastore = None
    if cfg.datastore:
        datastore = _child(content, dc.datastoreFolder, vim.Datastore, cfg.datastore, "datastore")
    return Placement(dc, folder, pool, datastore)


def _missing_folder(path: str | None) -> Any:
    raise ConfigError(f"[tool.vmenv.backends.vsphere]: folder = {path!r} does not exist")


def find_vm(content: Any, dc: Any, name: str) -> Any:
    """The VM named ``name`` anywhere under the datacenter's VM folder, or None."""
    view = content.viewManager.CreateContainerView(dc.vmFolder, [vim.VirtualMachine], True)
    try:
        return next((vm for vm in view.view if vm.name == name), None)
    finally:
        view.Destroy()


def find_snapshot(tree: Any, name: str) -> Any:
    """The snapshot called ``name`` in a snapshot tree (depth first), or None."""
    for node in tree or ():
        if node.name == name:
            return node.snapshot
        found = find_snapshot(node.childSnapshotList, name)
        if found is not None:
            return found
    return None
