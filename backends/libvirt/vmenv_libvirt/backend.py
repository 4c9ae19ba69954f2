"""LibvirtBackend: real QEMU guests through libvirt, linked qcow2 clones, RAM-state clones.

Lifecycle (see the README for the user's view):

* ``build_template``: a qcow2 overlay on the image (through the plugin's storage pool) is
  booted, provisioned through the guest agent (or over SSH: an image entry with
  ``agent = false``/``"auto"``, see :mod:`.remote`), synced and stopped: that disk is the template,
  the read-only backing file of every clone. Then, the fast path: an overlay on the template is
  booted once more and an internal snapshot *with RAM* (``vmenv-ready``) is taken of it.
  Templates are recorded in ``<state>/libvirt/templates/KEY.json``; a complete one is
  returned as it is (xdist workers, ``--vm-reuse``).
* ``clone``: a new overlay volume plus its own domain. Fast path: the RAM-state overlay's
  bytes are copied into the clone's volume (same backing file), the snapshot's metadata is
  redefined on the new domain (own name, own uuid: a restore with another ``<uuid>`` is what
  libvirt refuses, a redefined internal snapshot is not), and ``revertToSnapshot`` starts it
  running (QEMU ``-loadvm``). Cold path (networked clones, a different cpus/memory, SSH
  images, or ``ram_state = false``): an overlay on the template, booted.
* ``execute``/``copy_in``/``copy_out``: through the channel the template recorded: the agent,
  or SSH to the clone's DHCP-lease address (such clones must join a network).
* ``snapshot``/``revert``: internal snapshots with RAM; reverting to the template is a
  revert to ``vmenv-ready`` (fast clones) or a fresh overlay and a boot (cold ones).
* ``destroy``: destroy, undefine (with snapshot metadata), delete the volume, the console
  log, and the environment's network once no machine is on it. From any process, by the
  labels in the domain's ``<metadata>``; already gone is success.
* ``remove_template``: the template's disks and record, unless a clone (``--vm-keep``) still
  has it as its backing file (``TemplateInUse``; a later sweep removes it with the clone).

Every public method maps foreign exceptions at :func:`.connection.boundary`.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt  # type: ignore[import-untyped]

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

from .agent import CommandTimedOut
from .base import READY_SNAPSHOT, LibvirtBase
from .connection import NAME, boundary, is_gone
from .domains import read_labels, set_labels
from .images import resolve
from .inventory import built_on, owned_refs
from .remote import Runner, channel_config

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["LibvirtBackend"]

_RUNNING = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class LibvirtBackend(LibvirtBase):
    """The ``libvirt`` (alias ``kvm``) backend; see the module docstring. Thread-safe."""

    name = NAME
    builtin_images: tuple[str, ...] = ("tiny",)

    def capabilities(self) -> Capabilities:
        return Capabilities(live_snapshot=True, network=True, limits=True, console_log=True)

    def check(self) -> None:
        try:
            self.hv.call(lambda c: c.getLibVersion())
        except libvirt.libvirtError as exc:
            raise errors.BackendUnavailable(
                NAME,
                f"cannot connect to {self.uris[0]}: {exc}. Start libvirtd (without systemd: "
                "`.ci/libvirt.sh start`, or `virtlogd -d; libvirtd -d`)",
            ) from None

    # -- templates ------------------------------------------------------------------------
    @boundary
    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        record = self.load_record(key)
        if record is not None and record.get("complete"):
            return self._snapshot_of(record)
        self.check()
        started = time.monotonic()
        verdict = self.verdict()
        image = resolve(spec.image, spec.image_config, spec.name, self.lv_dir)
        mode, ssh = channel_config(spec.image_config, spec.image, image.tiny)
        cmdline = image.cmdline
        if ssh and image.tiny:  # the tiny ssh image's rcS writes authorized_keys from it
            cmdline += f" vmenv.ssh_key={ssh['public'].replace(' ', ',')}"
        boot: dict[str, Any] = {
            "kernel": str(image.kernel) if image.kernel else None,
            "initrd": str(image.initrd) if image.initrd else None,
            "cmdline": cmdline,
            "tiny": image.tiny,
        }
        dom = f"vmenv-tpl-{_short(key)}"
        self.stop(dom)  # a build of this key that died half-way (we hold the key's lock)
        # SSH needs an address: such a template is built on a private network of its own
        net = self.networks.ensure(f"build-{_short(key)}", session.id) if ssh else None
        disk = self.pool.create_overlay(f"tpl-{key}.qcow2", image.disk, spec.disk)
        labels = self.labels(
            session,
            spec.name,
            "template",
            template=key,
            disk=disk,
            console=self.console_path(dom),
            network=net,
        )
        try:
            seed = str(image.seed) if image.seed else None
            self.start(dom, labels, boot, disk, spec.memory, spec.cpus, net, seed=seed)
            used, ip = self.await_channel(dom, spec.name, spec.timeout, mode, ssh)
            runner = self.runner(dom, None, used, ip, spec.name)
            self._provision(runner, spec, started)
            sync = "sync; mount -o remount,ro / 2>/dev/null; sync"
            runner.execute(["/bin/sh", "-c", sync], timeout=60)
        except BaseException:
            self.stop(dom)
            self.pool.delete(disk)
            raise
        finally:
            self.console_path(dom).unlink(missing_ok=True)
            if net:
                self.remote.forget(dom)
                self.stop(dom)
                self.networks.release(net)
        self.stop(dom)
        ram = None
        if used:
            boot["ssh"] = {k: used[k] for k in ("user", "key", "port")}
        elif self.ram_state:
            ram = self._capture_ram(key, disk, boot, spec, session)
        record = {
            "key": key,
            "name": spec.name,
            "disk": str(disk),
            "ram": str(ram) if ram else "",
            "boot": boot,
            "memory": spec.memory,
            "cpus": spec.cpus,
            "accel": verdict.accel,
            "session": session.id,
            "owner": session.owner,
            "created": time.time(),
            "reuse": session.reuse,
            "complete": True,
            "seconds": time.monotonic() - started,
        }
        self.save_record(key, record)
        return self._snapshot_of(record)

    def _provision(self, runner: Runner, spec: MachineSpec, started: float) -> None:
        for step in spec.provision:
            argv = ["/bin/sh", "-c", step] if isinstance(step, str) else list(step)
            left = max(1.0, spec.timeout - (time.monotonic() - started))
            try:
                result = runner.execute(argv, timeout=left)
            except CommandTimedOut:
                raise errors.ProvisionError(
                    f"{NAME}: provision step {step!r} of {spec.name!r} timed out after "
                    f"{left:.0f}s (the spec's timeout)"
                ) from None
            if result.exit_code != 0:  # template networks have no <forward>: nothing leaves
                raise provision_failed(
                    NAME, spec.name, step, result.exit_code,
                    result.stdout, result.stderr, outbound=False,
                )  # fmt: skip

    def _capture_ram(
        self, key: str, disk: Path, boot: Mapping[str, Any], spec: MachineSpec, session: Session
    ) -> Path | None:
        """The fast path's RAM state: an overlay on the template holding ``vmenv-ready``."""
        dom = f"vmenv-ram-{_short(key)}"
        self.stop(dom)
        ram = self.pool.create_overlay(f"tpl-{key}-ram.qcow2", disk)
        labels = self.labels(
            session, spec.name, "state", template=key, disk=ram, console=self.console_path(dom)
        )
        try:
            self.start(dom, labels, boot, ram, spec.memory, spec.cpus)
            self.wait_ready(dom, spec.name, spec.timeout)
            self.agent(dom).run_simple("sync; echo 3 > /proc/sys/vm/drop_caches")
            xml = (
                f"<domainsnapshot><name>{READY_SNAPSHOT}</name>"
                "<memory snapshot='internal'/></domainsnapshot>"
            )
            self.hv.call(lambda c: c.lookupByName(dom).snapshotCreateXML(xml, 0))
        except (errors.VmenvError, libvirt.libvirtError, OSError) as exc:
            warnings.warn(
                f"{NAME}: no RAM-state fast path for {spec.name!r}: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
            self.stop(dom)
            self.pool.delete(ram)
            return None
        self.stop(dom)
        self.console_path(dom).unlink(missing_ok=True)
        return ram

    @boundary
    def remove_template(self, snapshot: Snapshot) -> None:
        """Delete the template's disks and record, unless a clone (a kept one, say) is still
        built on it: TemplateInUse names it, and the disks stay as its backing file."""
        holder = built_on(self.hv, self.uris, snapshot.key) if snapshot.key else ""
        if holder:
            raise errors.TemplateInUse(
                f"{NAME}: template {snapshot.key} left in place: {holder}", holder
            )
        record = self.load_record(snapshot.key) or {}
        for path in (record.get("ram"), record.get("disk"), snapshot.handle):
            if path:
                self.pool.delete(Path(str(path)))
        self.record_path(snapshot.key).unlink(missing_ok=True)

    # -- clones ---------------------------------------------------------------------------
    @boundary
    def clone(self, snapshot: Snapshot, spec: MachineSpec, session: Session) -> MachineRef:
        record = self._record(snapshot)
        ssh = record["boot"].get("ssh") or None
        if ssh and spec.network is None:
            raise errors.ConfigError(
                f"{NAME}: machine {spec.name!r}: its image has no guest agent, so commands go "
                'over SSH, which needs an address: give it a network (network="lan")'
            )
        uri = self.hv.roomiest()
        dom = f"vmenv-{spec.name}-{uuid.uuid4().hex[:8]}"
        fast = (
            bool(record.get("ram"))
            and self.ram_state
            and spec.network is None
            and record.get("memory") == spec.memory
            and record.get("cpus") == spec.cpus
            and Path(str(record["ram"])).exists()
        )
        net = self.networks.ensure(spec.network, session.id) if spec.network else None
        disk = self.pool.path / f"{dom}.qcow2"
        labels = self.labels(
            session,
            spec.name,
            "clone",
            template=snapshot.key,
            disk=disk,
            console=self.console_path(dom),
            network=net,
            uri=uri,
            ram="1" if fast else "",
            channel="ssh" if ssh else "",
            ssh_user=ssh["user"] if ssh else "",
            ssh_key=ssh["key"] if ssh else "",
            ssh_port=ssh["port"] if ssh else "",
        )
        try:
            self.pool.create_overlay(disk.name, Path(str(record["disk"])), spec.disk)
            if fast:
                shutil.copyfile(str(record["ram"]), disk)
            self.start(
                dom, labels, record["boot"], disk, spec.memory, spec.cpus, net, uri, restore=fast
            )
            ip = self._ready(dom, spec.name, spec.timeout, uri, net, fast, ssh)
        except BaseException:
            self._destroy(dom, uri)
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

    # -- commands and files -----------------------------------------------------------------
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
        runner = self._runner(ref)
        try:
            return runner.execute(
                argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
            )
        except CommandTimedOut:
            raise errors.CommandTimeout(ref.name, list(argv), timeout or 0.0) from None

    @boundary
    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        src = Path(src)
        if src.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_in {src}: is a directory; only files can be copied "
                "(pack it with tar first)"
            )
        self._runner(ref).write_file(dst, src.read_bytes(), src.stat().st_mode)

    @boundary
    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        self._runner(ref).copy_out(src, Path(dst), max_size, ref.name)

    def _runner(self, ref: MachineRef) -> Runner:
        """The agent, or SSH to ``ref.ip`` for a machine whose image has no agent."""
        return self.runner(ref.id, ref.data.get("uri"), ref.data.get("ssh"), ref.ip, ref.name)

    @boundary
    def shell(self, ref: MachineRef, argv: Sequence[str] | None = None) -> int:
        """Run ``argv`` (default: an ``id; uname -a`` report) and print its output.

        The agent has no terminal, so this is a command runner, not an interactive shell.
        """
        result = self.execute(ref, list(argv or ["/bin/sh", "-c", "id; uname -a"]))
        print(result.stdout, end="")
        print(result.stderr, end="")
        return result.exit_code

    # -- snapshots --------------------------------------------------------------------------
    @boundary
    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        snap = f"{''.join(c if c.isalnum() else '-' for c in name)}-{uuid.uuid4().hex[:6]}"
        xml = f"<domainsnapshot><name>{snap}</name><memory snapshot='internal'/></domainsnapshot>"
        self.hv.call(
            lambda c: c.lookupByName(ref.id).snapshotCreateXML(xml, 0), ref.data.get("uri")
        )
        return Snapshot(
            backend=NAME,
            name=name,
            handle=f"{ref.id}/{snap}",
            data={"domain": ref.id, "snapshot": snap},
        )

    @boundary
    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        uri = ref.data.get("uri")
        if not snapshot.key:
            owner, _, snap = snapshot.handle.partition("/")
            if owner != ref.id:
                raise errors.BackendError(
                    f"{NAME}: snapshot {snapshot.name!r} belongs to {owner}, not {ref.name!r}"
                )
            self.hv.call(
                lambda c: c.lookupByName(ref.id).revertToSnapshot(
                    c.lookupByName(ref.id).snapshotLookupByName(snap), _RUNNING
                ),
                uri,
            )
            if ref.data.get("ssh"):  # the guest's TCP state is the snapshot's: reconnect
                self.remote.forget(ref.id)
                self._ready(ref.id, ref.name, 120.0, uri, None, False, ref.data["ssh"])
            else:
                self.wait_ready(ref.id, ref.name, 120.0, uri)
            return
        labels = self.hv.call(lambda c: read_labels(c.lookupByName(ref.id)), uri) or {}
        if labels.get("ram") == "1":
            self.hv.call(
                lambda c: c.lookupByName(ref.id).revertToSnapshot(
                    c.lookupByName(ref.id).snapshotLookupByName(READY_SNAPSHOT), _RUNNING
                ),
                uri,
            )
            self._ready(ref.id, ref.name, 120.0, uri, None, True)
            return
        record = self._record(snapshot)
        disk = Path(labels.get("disk") or self.pool.path / f"{ref.id}.qcow2")

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
        self.pool.delete(disk)
        self.pool.create_overlay(disk.name, Path(str(record["disk"])))
        self.hv.call(lambda c: c.lookupByName(ref.id).create(), uri)
        self.remote.forget(ref.id)
        net = labels.get("network") or None
        self._ready(ref.id, ref.name, 300.0, uri, net, False, ref.data.get("ssh"))

    def console_log(self, ref: MachineRef) -> str:
        return self.console_tail(ref.id, 256 * 1024)

    # -- teardown and inventory ---------------------------------------------------------------
    @boundary
    def destroy(self, ref: MachineRef) -> None:
        self._destroy(ref.id, ref.data.get("uri"))

    def _destroy(self, dom: str, uri: str | None = None) -> None:
        """Remove ``dom`` and what it owns (from any process); already gone is success."""
        labels: dict[str, str] | None = None
        self.remote.forget(dom)
        for target in [uri] if uri else self.uris:
            labels = self.stop(dom, target)
            if labels is not None:
                break
        labels = labels or {}
        self.pool.delete(Path(labels.get("disk") or self.pool.path / f"{dom}.qcow2"))
        Path(labels.get("console") or self.console_path(dom)).unlink(missing_ok=True)
        if labels.get("network"):
            self.networks.release(labels["network"])

    @boundary
    def keep(self, ref: MachineRef) -> None:
        """Mark the machine kept (its domain is persistent: it outlives us anyway)."""

        def mark(conn: libvirt.virConnect) -> None:
            domain = conn.lookupByName(ref.id)
            labels = read_labels(domain) or {}
            labels["kept"] = "1"
            set_labels(domain, labels)

        self.hv.call(mark, ref.data.get("uri"))

    def owned(self, session: str | None = None) -> Iterable[MachineRef]:
        """Every domain with our labels (of ``session`` only, if given), any role or state."""
        return owned_refs(self.hv, self.uris, session)

    def close(self) -> None:
        """Close the connections (machines are destroyed by the orchestrator, not here)."""
        if self._remote is not None:
            self._remote.close()
        self.hv.close()
