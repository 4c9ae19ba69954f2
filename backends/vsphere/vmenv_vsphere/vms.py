"""VM operations the backend is built from: clone, power, snapshot, destroy, properties.

Each takes the process's :class:`~.connection.Connection` and waits for its task with the
bounded :meth:`Connection.wait`, so a fault surfaces as a :mod:`pytest_vmenv.errors` error with
the fault's message. Round trips are kept few: a clone's labels, CPU, memory and NIC go in the
one ``CloneVM_Task`` call, and properties are read with one ``RetrievePropertiesEx`` rather
than pyvmomi's one-call-per-attribute access.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pyVmomi import vim, vmodl

from pytest_vmenv.errors import ConfigError, VmenvError

from .connection import Connection
from .inventory import Placement, extra_config

__all__ = [
    "check_name",
    "clone_vm",
    "destroy_vm",
    "events",
    "exists",
    "power_off",
    "power_on",
    "props",
    "resize",
    "snapshot",
    "vm_by_id",
]

log = logging.getLogger("vmenv.vsphere")
_FORBIDDEN = frozenset("/\\%")
_INSTANT_FALLBACK: set[str] = set()


def check_name(name: str) -> str:
    """Refuse VM names a datastore path could be built from (``../x``), or over 80 chars."""
    if not name or len(name) > 80 or _FORBIDDEN & set(name) or name in (".", ".."):
        raise ConfigError(
            f"vsphere: VM name {name!r} is not allowed: use 1-80 characters without '/', "
            "'\\' or '%' (vCenter derives datastore paths from it)"
        )
    return name


def vm_by_id(conn: Connection, moref: str) -> Any:
    """A VirtualMachine stub for ``moref`` (no round trip)."""
    return vim.VirtualMachine(moref, conn.stub)


def props(conn: Connection, obj: Any, paths: Sequence[str]) -> dict[str, Any]:
    """``paths`` of ``obj`` in one call; unset properties are absent."""
    pc = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=obj, skip=False)],
        propSet=[pc.PropertySpec(type=type(obj), pathSet=list(paths))],
    )
    result = conn.content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
    if result is None or not result.objects:
        raise vmodl.fault.ManagedObjectNotFound(obj=obj, msg=f"{obj._moId} does not exist")
    return {p.name: p.val for p in result.objects[0].propSet}


def exists(conn: Connection, vm: Any) -> bool:
    """Whether ``vm`` is still in the inventory."""
    try:
        props(conn, vm, ["name"])
    except vmodl.fault.ManagedObjectNotFound:
        return False
    return True


def events(conn: Connection, vm: Any) -> str:
    """The VM's recent vCenter events: the nearest thing to a console vSphere offers.

    Best effort, for a timeout's message: what cannot be read is said in one line.
    """
    try:
        spec = vim.event.EventFilterSpec(
            entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self")
        )
        got = conn.call(lambda: conn.content.eventManager.QueryEvents(spec))
        return "\n".join(f"{e.createdTime:%H:%M:%S} {e.fullFormattedMessage}" for e in got[-50:])
    except (vmodl.MethodFault, OSError, VmenvError) as exc:
        return f"(no events: {exc})"


def _nic_change(conn: Connection, source: Any, dc: Any, network: str) -> list[Any]:
    """Device change putting the source's first NIC on port group ``network``."""
    target = next((n for n in dc.network if n.name == network), None)
    if target is None:
        names = ", ".join(sorted(n.name for n in dc.network)) or "(none)"
        raise ConfigError(f"vsphere: network {network!r} is no port group. Choose one of: {names}")
    devices = props(conn, source, ["config.hardware.device"]).get("config.hardware.device", ())
    nic = next((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), None)
    if nic is None:
        raise ConfigError(f"vsphere: the template has no network card to put on {network!r}")
    if isinstance(target, vim.dvs.DistributedVirtualPortgroup):
        switch: Any = target.config.distributedVirtualSwitch
        port = vim.dvs.PortConnection(portgroupKey=target.key, switchUuid=switch.uuid)
        nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    else:
        nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=network, network=target
        )
    return [vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)]


def clone_vm(
    conn: Connection,
    source: Any,
    snapshot: Any,
    name: str,
    place: Placement,
    *,
    labels: Mapping[str, str],
    annotation: str,
    network: str | None = None,
    instant: bool = False,
) -> Any:
    """A powered-off linked clone of ``source`` at ``snapshot`` into ``place``; the VM.

    ``instant``: try ``InstantClone_Task`` (needs a running source) and fall back to a
    linked clone where the server does not support it.
    """
    check_name(name)
    relocate = vim.vm.RelocateSpec(
        pool=place.pool, datastore=place.datastore, diskMoveType="createNewChildDiskBacking"
    )
    options = extra_config(labels)
    if instant and conn.config.host not in _INSTANT_FALLBACK:
        try:
            spec = vim.vm.InstantCloneSpec(name=name, location=relocate, config=options)
            return conn.wait(source.InstantClone_Task(spec=spec), f"instant clone {name}")
        except (
            vmodl.fault.MethodNotFound,
            vmodl.fault.NotSupported,
            vim.fault.InvalidState,
        ) as exc:
            _INSTANT_FALLBACK.add(conn.config.host)
            log.info("vsphere: instant clone unavailable (%s); using linked clones", exc.msg)
    config = vim.vm.ConfigSpec(annotation=annotation, extraConfig=options)
    if network:
        config.deviceChange = _nic_change(conn, source, place.datacenter, network)
    spec = vim.vm.CloneSpec(
        location=relocate, snapshot=snapshot, powerOn=False, template=False, config=config
    )
    task = source.CloneVM_Task(folder=place.folder, name=name, spec=spec)
    return conn.wait(task, f"clone {name}")


def resize(conn: Connection, vm: Any, have: tuple[int, int], cpus: int, memory_mb: int) -> None:
    """Reconfigure ``vm`` to ``cpus``/``memory_mb`` unless it has them (``have``) already.

    A reconfigure, not the clone spec: it is applied the same way by every vCenter version
    (and by vcsim, which ignores hardware in a clone spec), before the clone first powers on.
    """
    if have == (cpus, memory_mb):
        return
    spec = vim.vm.ConfigSpec(numCPUs=cpus, memoryMB=memory_mb)
    conn.wait(vm.ReconfigVM_Task(spec), f"set {cpus} CPUs and {memory_mb} MB")


def snapshot(conn: Connection, vm: Any, name: str, description: str, what: str) -> Any:
    """A disk-only snapshot of ``vm`` (no memory, no quiescing: fast and Tools-free)."""
    task = vm.CreateSnapshot_Task(name, description, False, False)
    return conn.wait(task, f"snapshot {what}")


def power_on(conn: Connection, vm: Any, what: str) -> None:
    """Power ``vm`` on unless it already is."""
    if props(conn, vm, ["runtime.powerState"]).get("runtime.powerState") != "poweredOn":
        conn.wait(vm.PowerOnVM_Task(), f"power on {what}")


def power_off(conn: Connection, vm: Any, what: str) -> None:
    """Power ``vm`` off (hard); already off is fine."""
    with contextlib.suppress(vim.fault.InvalidPowerState):
        conn.wait(vm.PowerOffVM_Task(), f"power off {what}")


def destroy_vm(conn: Connection, vm: Any, what: str, session: str | None) -> None:
    """Power off and delete ``vm``; gone (or not labelled ``session``) is success."""
    try:
        got = props(conn, vm, ["runtime.powerState", "config.extraConfig"])
    except vmodl.fault.ManagedObjectNotFound:
        return
    labels = {o.key: o.value for o in got.get("config.extraConfig") or ()}
    if session is not None and labels.get("guestinfo.vmenv.session") != session:
        log.warning("vsphere: not destroying %s: it does not carry session %s", what, session)
        return
    try:
        if got.get("runtime.powerState") == "poweredOn":
            with contextlib.suppress(vim.fault.InvalidPowerState):
                conn.wait(vm.PowerOffVM_Task(), f"power off {what}")
        conn.wait(vm.Destroy_Task(), f"destroy {what}")
    except vmodl.fault.ManagedObjectNotFound:
        return
