"""Templates: a provisioned, stopped qcow2 disk, and the RAM state a fast clone starts from.

Contract of :meth:`Templates.build`: a qcow2 overlay on the image (through the plugin's
storage pool) is booted, provisioned through its channel (the guest agent, or SSH for an
image entry with ``agent = false``/``"auto"``, see :mod:`.remote`; such a template is built
on a private network of its own), synced and stopped: that disk is the template, the
read-only backing file of every clone. Then, the fast path (agent images, ``ram_state``,
an image that is not a VMDK: QEMU cannot save the RAM of a machine with a ``vmdk`` node in
its disk's chain): an overlay on the template is booted once more and an internal snapshot
*with RAM* (:data:`.domains.READY_SNAPSHOT`) is taken of it. The result is recorded
(:mod:`.records`); a complete record is returned as it is (xdist workers, ``--vm-reuse``).

:meth:`Templates.remove` deletes the disks and the record, unless a clone (``--vm-keep``)
still has them as its backing file (``TemplateInUse``; a later sweep removes it with the
clone).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import Network, Session, Snapshot
from pytest_vmenv.diagnose import provision_failed
from pytest_vmenv.images import recipe_of

from .agent import CommandTimedOut
from .connection import NAME
from .domains import READY_SNAPSHOT, image_format, machine_labels, snapshot_xml
from .guests import Launch
from .images import BootImage, resolve
from .parts import Parts
from .remote import Runner, channel_config
from .stored import building_on, forget

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["Templates", "short"]

_SYNC = "sync; mount -o remount,ro / 2>/dev/null; sync"


def short(text: str) -> str:
    """A short stable digest of ``text`` (for domain and network names)."""
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class _Build:
    """One build of template ``key``: its boot entry, its disk, the channel it talks."""

    key: str
    spec: MachineSpec
    session: Session
    image: BootImage
    boot: dict[str, Any]
    mode: str
    ssh: Mapping[str, Any]

    @property
    def dom(self) -> str:
        return f"vmenv-tpl-{short(self.key)}"


class Templates:
    """Build, list and remove templates (see the module docstring); thread-safe."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.paths = parts.paths
        self.hv = parts.hv
        self.guests = parts.guests
        self.channels = parts.channels
        self.pool = parts.pool
        self.networks = parts.networks
        self.records = parts.records

    def build(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        record = self.records.load(key)
        if record is not None and record.get("complete"):
            return self.records.snapshot(record)
        self.hv.check()
        started = time.monotonic()
        verdict = self.parts.accel.verdict()
        build = self._plan(spec, key, session)
        disk, used = self._first_boot(build, started)
        ram = None
        if used:
            build.boot["ssh"] = {k: used[k] for k in ("user", "key", "port")}
        elif self.parts.config.ram_state and image_format(build.image.disk)[0] != "vmdk":
            ram = self._capture_ram(build, disk)
        record = {
            "key": key,
            "name": spec.name,
            "disk": str(disk),
            "ram": str(ram) if ram else "",
            "boot": build.boot,
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
        self.records.save(key, record)
        return self.records.snapshot(record)

    def _plan(self, spec: MachineSpec, key: str, session: Session) -> _Build:
        image = resolve(spec.image, spec.image_config, spec.name, self.paths.root, recipe_of(spec))
        mode, ssh = channel_config(spec.image_config, spec.image, image.tiny)
        cmdline = image.cmdline
        if ssh and image.tiny:  # the tiny ssh image's rcS writes authorized_keys from it
            cmdline += f" vmenv.ssh_key={ssh['public'].replace(' ', ',')}"
        boot: dict[str, Any] = {
            "kernel": str(image.kernel) if image.kernel else None,
            "initrd": str(image.initrd) if image.initrd else None,
            "cmdline": cmdline,
            "tiny": image.tiny,
            "systemd": image.systemd,
            "controller": image.controller,
        }
        return _Build(key, spec, session, image, boot, mode, ssh)

    def _first_boot(self, build: _Build, started: float) -> tuple[Path, Mapping[str, Any] | None]:
        """Boot an overlay on the image, provision it, sync and stop: (its disk, SSH used)."""
        spec, dom = build.spec, build.dom
        self.guests.stop(dom)  # a build of this key that died half-way (we hold the key's lock)
        # SSH needs an address: such a template is built on a private network of its own
        net = None
        if build.ssh:
            net = self.networks.ensure(Network("build", short(build.key)), build.session.id)
        disk = building_on(
            build.image.built, build.key, self.paths.state_dir,
            lambda: self.pool.create_overlay(f"tpl-{build.key}.qcow2", build.image.disk, spec.disk),
        )  # fmt: skip
        console = self.paths.console(dom)
        labels = machine_labels(
            build.session, self.paths.state_dir, spec.name, "template", template=build.key,
            disk=disk, console=console, network=net,
        )  # fmt: skip
        seed = str(build.image.seed) if build.image.seed else None
        try:
            self.guests.start(
                Launch(dom, labels, build.boot, disk, spec.memory, spec.cpus, net, seed=seed)
            )
            used, ip = self.channels.await_(dom, spec.name, spec.timeout, build.mode, build.ssh)
            if build.boot.get("systemd") and not used:
                self.channels.wait_systemd(dom, spec.name, spec.timeout)
            if build.image.seed and not used:  # its results belong in the template's disk
                self.channels.wait_cloud_init(dom, spec.name, spec.timeout)
            runner = self.channels.runner(dom, None, used, ip, spec.name)
            self._provision(runner, spec, started)
            runner.execute(["/bin/sh", "-c", _SYNC], timeout=60)
        except BaseException:
            self.guests.stop(dom)
            self.pool.delete(disk)
            raise
        finally:
            self.paths.console(dom).unlink(missing_ok=True)
            if net:
                self.channels.forget(dom)
                self.guests.stop(dom)
                self.networks.release(net)
        self.guests.stop(dom)
        return disk, used

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

    def _capture_ram(self, build: _Build, disk: Path) -> Path | None:
        """The fast path's RAM state: an overlay on the template holding ``vmenv-ready``."""
        spec, dom = build.spec, f"vmenv-ram-{short(build.key)}"
        self.guests.stop(dom)
        ram = self.pool.create_overlay(f"tpl-{build.key}-ram.qcow2", disk)
        labels = machine_labels(build.session, self.paths.state_dir, spec.name, "state",
                                template=build.key, disk=ram,
                                console=self.paths.console(dom))  # fmt: skip
        try:
            self.guests.start(Launch(dom, labels, build.boot, ram, spec.memory, spec.cpus))
            self.channels.wait_agent(dom, spec.name, spec.timeout)
            if build.boot.get("systemd"):
                self.channels.wait_systemd(dom, spec.name, spec.timeout)
            self.channels.agent(dom).run_simple("sync; echo 3 > /proc/sys/vm/drop_caches")
            xml = snapshot_xml(READY_SNAPSHOT)
            self.hv.call(lambda c: c.lookupByName(dom).snapshotCreateXML(xml, 0))
        except (errors.VmenvError, libvirt.libvirtError, OSError) as exc:
            warnings.warn(
                f"{NAME}: no RAM-state fast path for {spec.name!r}: {exc}",
                RuntimeWarning,
                stacklevel=4,
            )
            self.guests.stop(dom)
            self.pool.delete(ram)
            return None
        self.guests.stop(dom)
        self.paths.console(dom).unlink(missing_ok=True)
        return ram

    def remove(self, snapshot: Snapshot) -> None:
        """Delete the template's disks and record, unless a clone (a kept one, say) is still
        built on it: TemplateInUse names it, and the disks stay as its backing file."""
        holder = self.parts.inventory.built_on(snapshot.key) if snapshot.key else ""
        if holder:
            raise errors.TemplateInUse(
                f"{NAME}: template {snapshot.key} left in place: {holder}", holder
            )
        record = self.records.load(snapshot.key) or {}
        for path in (record.get("ram"), record.get("disk"), snapshot.handle):
            if path:
                self.pool.delete(Path(str(path)))
        forget(record or snapshot.data)
        self.records.delete(snapshot.key)
