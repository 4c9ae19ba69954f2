"""The vSphere backend's plumbing: the shared login, placement, folders, guest channels.

Split from :mod:`.backend` (which holds the protocol methods) to keep both readable.
:func:`boundary` is the one place foreign exceptions become :mod:`pytest_vmenv.errors`;
:meth:`VsphereBase.guest_endpoint` is the one seam between a VM and the address its commands
go to; :meth:`VsphereBase._channel` picks SSH (configured) or VMware Tools guest operations
(:mod:`.guestops`); :meth:`VsphereBase._ready` is what "ready" means (Tools IP, then SSH
answering when SSH is the channel).
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from pyVmomi import vim, vmodl
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_exponential

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef, Session, Snapshot

from . import inventory, vms
from .config import VsphereConfig
from .connection import Connection, connect, map_fault
from .guestops import GuestOpsChannel

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec
    from pytest_vmenv.ssh import SSHChannel

__all__ = ["NAME", "VsphereBase", "boundary"]

NAME = "vsphere"
_F = TypeVar("_F", bound=Callable[..., Any])
_BASE_SNAPSHOT = "vmenv-base"


def boundary(func: _F) -> _F:
    """Map vSphere faults and OS errors into the error tree, naming the operation."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.VmenvError:
            raise
        except vmodl.MethodFault as exc:
            raise map_fault(exc, func.__name__) from None
        except (OSError, ValueError) as exc:
            raise errors.BackendError(f"{NAME}: {func.__name__} failed: {exc}") from exc

    return wrapper  # type: ignore[return-value]


def _handle(vm: Any, snap: Any) -> str:
    return f"{vm._moId}/{snap._moId}"


class VsphereBase:
    """Connection, placement and guest access shared by the protocol methods."""

    name = NAME

    def __init__(
        self, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.config = VsphereConfig.load(options or {}, environ)
        self._conn: Connection | None = None
        self._place: inventory.Placement | None = None
        self._lock = threading.RLock()
        self._folders: dict[str, Any] = {}
        self._channels: dict[str, SSHChannel | GuestOpsChannel] = {}
        self._gone: set[str] = set()
        self._hardware: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"<VsphereBackend {self.config.user}@{self.config.host}:{self.config.port}>"

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def conn(self) -> Connection:
        with self._lock:
            if self._conn is None:
                if not self.config.host:
                    raise errors.BackendUnavailable(
                        NAME, "no server configured: set host in [tool.vmenv.backends.vsphere] "
                        "or GOVC_URL",
                    )  # fmt: skip
                self._conn = connect(self.config)
            return self._conn

    def _call(self, fn: Callable[[], Any]) -> Any:
        return self.conn.call(fn)

    @property
    def place(self) -> inventory.Placement:
        with self._lock:
            if self._place is None:
                self._place = self._call(
                    lambda: inventory.placement(self.conn.content, self.config)
                )
            return self._place

    def _folder(self, name: str) -> Any:
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

        folder = self._call(find_or_make)
        with self._lock:
            self._folders[name] = folder
        return folder

    def _vm(self, moref: str) -> Any:
        return vms.vm_by_id(self.conn, moref)

    def _split(self, snapshot: Snapshot) -> tuple[Any, Any]:
        vm_id, _, snap_id = snapshot.handle.partition("/")
        return self._vm(vm_id), vim.vm.Snapshot(snap_id, self.conn.stub)

    def _labels(self, session: Session, name: str, parent: Any, **extra: str) -> dict[str, str]:
        labels = {
            "session": session.id, "owner": session.owner, "created": f"{time.time():.3f}",
            "name": name, "parent": parent._moId, **extra,
        }  # fmt: skip
        out = {inventory.PREFIX + k: v for k, v in labels.items()}
        out["guestinfo.metadata"] = inventory.metadata(name, uuid.uuid4().hex)
        return out

    # -- readiness and commands ---------------------------------------------------------------
    def guest_endpoint(self, ref: MachineRef) -> tuple[str, int]:
        """Where SSH reaches ``ref``'s guest: its Tools-reported IP and the configured port.

        The one seam for a lab whose guests share an address (vcsim's tests override it).
        """
        ip = ref.ip or self._call(
            lambda: vms.props(self.conn, self._vm(ref.id), ["guest.ipAddress"]).get(
                "guest.ipAddress"
            )
        )
        if not ip:
            raise errors.BackendError(f"{NAME}: machine {ref.name!r} has no IP (VMware Tools)")
        return str(ip), self.config.ssh_port

    def _wait_ip(self, vm: Any, name: str, timeout: float) -> str:
        def ip() -> str | None:
            got = vms.props(self.conn, vm, ["guest.ipAddress"]).get("guest.ipAddress")
            return str(got) if got else None

        retrying = Retrying(
            stop=stop_after_delay(timeout),
            wait=wait_exponential(multiplier=0.02, max=2),
            retry=retry_if_result(lambda r: r is None),
        )
        try:
            return str(retrying(lambda: self._call(ip)))
        except RetryError:
            raise errors.BootTimeout(
                f"{NAME}: {name}: VMware Tools reported no IP within {timeout:g}s (is "
                "open-vm-tools installed and running in the template, with a NIC on a network "
                "that hands out addresses?)",
                self._events(vm),
            ) from None

    def _channel(self, ref: MachineRef) -> SSHChannel | GuestOpsChannel:
        """The command channel: SSH when configured, else VMware Tools guest operations."""
        if ref.id in self._gone:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} ({ref.id}) was destroyed")
        with self._lock:
            channel = self._channels.get(ref.id)
        if channel is not None:
            return channel
        channel = self._ssh_channel(ref) if self.config.uses_ssh else self._guest_channel(ref)
        with self._lock:
            return self._channels.setdefault(ref.id, channel)

    def _ssh_channel(self, ref: MachineRef) -> SSHChannel:
        from pytest_vmenv.ssh import SSHChannel

        host, port = self.guest_endpoint(ref)
        return SSHChannel(
            host, port, self.config.ssh_user, key=self.config.ssh_key,
            password=self.config.ssh_password.reveal() or None,
            known_hosts=self.config.known_hosts, machine=ref.name,
        )  # fmt: skip

    def _guest_channel(self, ref: MachineRef) -> GuestOpsChannel:
        cfg = self.config
        if not (cfg.guest_user and cfg.guest_password):
            raise errors.BackendError(
                f"{NAME}: commands need SSH or VMware Tools guest operations: set ssh_key or "
                "ssh_password (SSH), or guest_user and guest_password (guest operations), in "
                "[tool.vmenv.backends.vsphere]"
            )
        vm = self._vm(ref.id)
        status = self._call(
            lambda: vms.props(self.conn, vm, ["guest.toolsRunningStatus"]).get(
                "guest.toolsRunningStatus"
            )
        )
        if status != "guestToolsRunning":
            raise errors.BackendError(
                f"{NAME}: {ref.name}: VMware Tools is not running in the guest "
                f"(guest.toolsRunningStatus = {status}); guest operations need it: install and "
                "start open-vm-tools in the template, or set ssh_key or ssh_password"
            )
        return GuestOpsChannel(
            self.conn, vm, cfg.guest_user, cfg.guest_password, machine=ref.name,
            max_wait=cfg.task_timeout,
        )  # fmt: skip

    def _ready(self, ref: MachineRef, vm: Any, timeout: float) -> MachineRef:
        deadline = time.monotonic() + timeout
        ref = replace(ref, ip=self._wait_ip(vm, ref.name, timeout))
        if self.config.uses_ssh:
            from pytest_vmenv.ssh import SSHChannel, SSHUnreachable

            channel = self._channel(ref)
            assert isinstance(channel, SSHChannel)
            try:
                channel.wait_ready(max(deadline - time.monotonic(), 1.0))
            except SSHUnreachable as exc:
                raise errors.BootTimeout(f"{NAME}: {ref.name}: {exc}", self._events(vm)) from None
        return ref

    def _exists(self, ref: MachineRef) -> bool:
        try:
            self._call(lambda: vms.props(self.conn, self._vm(ref.id), ["name"]))
        except vmodl.fault.ManagedObjectNotFound:
            return False
        return True

    def _base(self, spec: MachineSpec) -> tuple[Any, Any]:
        """The image's template VM and snapshot (made if missing and ``create_snapshot``)."""
        ic = spec.image_config
        template = ic.get("template")
        if not isinstance(template, str) or not template:
            raise errors.ConfigError(
                f'image {spec.image!r}: its vsphere entry needs template = "VM NAME", e.g. '
                '{ template = "debian-12", snapshot = "clean" }'
            )
        snap_name = str(ic.get("snapshot") or _BASE_SNAPSHOT)

        def find() -> tuple[Any, Any]:
            vm = inventory.find_vm(self.conn.content, self.place.datacenter, template)
            if vm is None:
                raise errors.ConfigError(
                    f"image {spec.image!r}: no VM or template named {template!r}"
                )
            tree = vms.props(self.conn, vm, ["snapshot"]).get("snapshot")
            snap = inventory.find_snapshot(tree.rootSnapshotList if tree else (), snap_name)
            if snap is None:
                if not ic.get("create_snapshot"):
                    raise errors.ConfigError(
                        f"image {spec.image!r}: {template!r} has no snapshot {snap_name!r}; take "
                        "one (linked clones need it), or set create_snapshot = true"
                    )
                task = vm.CreateSnapshot_Task(snap_name, "made by pytest-vmenv", False, False)
                snap = self.conn.wait(task, f"snapshot {template}")
            return vm, snap

        result: tuple[Any, Any] = self._call(find)
        return result

    def _new_vm(
        self, spec: MachineSpec, session: Session, source: Any, snap: Any, folder: Any,
        power_on: bool, **labels: str,
    ) -> Any:  # fmt: skip
        vm_name = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        extra = {str(k): str(v) for k, v in dict(spec.image_config.get("extra_config", {})).items()}
        all_labels = {**extra, **self._labels(session, spec.name, source, **labels)}
        network = (spec.network and spec.network.partition("#")[0]) or self.config.network
        return self._call(
            lambda: vms.clone_vm(
                self.conn, source, snap, vm_name, folder, self.place, labels=all_labels,
                annotation=f"Made by pytest-vmenv for machine {spec.name!r} of session "
                f"{session.id}; `vmenv gc` removes it once that session is gone.",
                network=network, power_on=power_on, instant=bool(spec.image_config.get("instant")),
            )
        )  # fmt: skip

    def _resize(self, vm: Any, source: Any, spec: MachineSpec) -> None:
        """Apply ``cpus``/``memory`` with a reconfigure (skipped when the source matches)."""
        with self._lock:
            have = self._hardware.get(source._moId)
        if have is None:
            got = self._call(lambda: vms.props(self.conn, source, ["config.hardware"]))
            hw = got["config.hardware"]
            have = (int(hw.numCPU), int(hw.memoryMB))
            with self._lock:
                self._hardware[source._moId] = have
        memory_mb = max(spec.memory // 2**20, 4)
        self._call(lambda: vms.resize(self.conn, vm, have, spec.cpus, memory_mb))

    def _take(self, vm: Any, name: str, description: str, what: str) -> Any:
        """A disk-only snapshot of ``vm`` (no memory, no quiescing: fast and Tools-free)."""

        def take() -> Any:
            task = vm.CreateSnapshot_Task(name, description, False, False)
            return self.conn.wait(task, f"snapshot {what}")

        return self._call(take)

    def _drop_channel(self, moref: str) -> None:
        with self._lock:
            channel = self._channels.pop(moref, None)
        if channel is not None:
            channel.close()

    def _events(self, vm: Any) -> str:
        """The VM's recent vCenter events: the nearest thing to a console vSphere offers."""
        try:
            spec = vim.event.EventFilterSpec(
                entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self")
            )
            events = self._call(lambda: self.conn.content.eventManager.QueryEvents(spec))
            return "\n".join(
                f"{e.createdTime:%H:%M:%S} {e.fullFormattedMessage}" for e in events[-50:]
            )
        except (vmodl.MethodFault, OSError, errors.VmenvError) as exc:
            return f"(no events: {exc})"
