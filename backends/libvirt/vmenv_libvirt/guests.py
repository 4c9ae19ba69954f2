"""Guests: defining and starting a domain, stopping it, and waiting until it is ready.

Everything here takes domain *names* and looks the domain up on the connection it is handed,
so a dropped connection can be re-opened under any call (see :class:`.connection.Hypervisor`).

Contract: :meth:`Guests.start` defines and starts a :class:`Launch` (or, with ``restore``,
redefines its disk's RAM-state snapshot and reverts to it: the domain runs from there);
:meth:`Guests.stop` destroys and undefines a domain of any process; :meth:`Guests.ready`
waits for its channel, sets its hostname, its clock (after a restore), and on a network its
address, which goes into every member's ``/etc/hosts`` so that machines reach each other by
name.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.poll import poll_until

from .accel import Accelerator
from .agent import AgentError
from .channels import Channels
from .config import Paths
from .connection import NAME, Hypervisor, is_gone
from .domains import (
    READY_SNAPSHOT,
    REVERT_RUNNING,
    labels_xml,
    read_labels,
    render_domain,
    set_labels,
)
from .remote import ssh_of

__all__ = ["Guests", "Launch"]

_UNDEFINE = (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
)
_REDEFINE = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT


@dataclass(frozen=True)
class Launch:
    """A domain to define and start: ``boot`` is a template record's boot entry (kernel,
    initrd, cmdline, tiny); ``restore`` starts it from its disk's RAM-state snapshot."""

    dom: str
    labels: Mapping[str, object]
    boot: Mapping[str, Any]
    disk: Path
    memory: int
    cpus: int
    network: str | None = None
    uri: str | None = None
    restore: bool = False
    seed: str | None = None


class Guests:
    """The domains of one backend: start, stop, ready; thread-safe."""

    def __init__(
        self,
        hv: Hypervisor,
        paths: Paths,
        channels: Channels,
        accel: Accelerator,
        domain_xml: Path | None = None,
    ) -> None:
        self.hv = hv
        self.paths = paths
        self.channels = channels
        self.accel = accel
        self.domain_xml = domain_xml

    def _xml(self, launch: Launch) -> str:
        console = self.paths.console(launch.dom)
        console.unlink(missing_ok=True)
        cmdline = str(launch.boot.get("cmdline") or "")
        if launch.boot.get("tiny"):
            cmdline += f" vmenv.hostname={launch.labels['name']}"
        elif launch.boot.get("systemd") and launch.boot.get("kernel"):
            cmdline += f" systemd.hostname={launch.labels['name']}"
        return render_domain(
            self.domain_xml,
            name=launch.dom,
            uuid=str(uuid.uuid4()),
            accel=self.accel.verdict().accel,
            memory=launch.memory,
            cpus=launch.cpus,
            kernel=launch.boot.get("kernel"),
            initrd=launch.boot.get("initrd"),
            cmdline=cmdline,
            disk=str(launch.disk),
            controller=launch.boot.get("controller") or "virtio",
            seed=launch.seed,
            network=launch.network,
            mac="52:54:00:" + secrets.token_bytes(3).hex(":"),
            console=str(console),
            metadata=labels_xml(launch.labels),
        )

    def start(self, launch: Launch) -> None:
        """Define and start ``launch``; with ``restore``, from its disk's RAM-state snapshot."""
        xml = self._xml(launch)

        def go(conn: libvirt.virConnect) -> None:
            domain = conn.defineXML(xml)
            if not launch.restore:
                domain.create()
                return
            snap_xml = (
                f"<domainsnapshot><name>{READY_SNAPSHOT}</name><state>running</state>"
                f"<creationTime>{int(time.time())}</creationTime>"
                "<memory snapshot='internal'/><disks><disk name='vda' snapshot='internal'/>"
                f"</disks>{xml}</domainsnapshot>"
            )
            domain.revertToSnapshot(domain.snapshotCreateXML(snap_xml, _REDEFINE), REVERT_RUNNING)

        self.hv.call(go, launch.uri)

    def stop(self, dom: str, uri: str | None = None) -> dict[str, str] | None:
        """Destroy and undefine ``dom`` (any process's); its labels, or None if it was gone."""

        def kill(conn: libvirt.virConnect) -> dict[str, str] | None:
            try:
                domain = conn.lookupByName(dom)
            except libvirt.libvirtError as exc:
                if is_gone(exc):
                    return None
                raise
            labels = read_labels(domain) or {}
            for step in (domain.destroy, lambda: domain.undefineFlags(_UNDEFINE)):
                try:
                    step()
                except libvirt.libvirtError as exc:
                    if not is_gone(exc):
                        raise
            return labels

        return self.hv.call(kill, uri)

    def wait_ip(self, dom: str, name: str, timeout: float, uri: str | None = None) -> str:
        """``dom``'s first IPv4 address as its agent reports it; BootTimeout with the console."""
        agent = self.channels.agent(dom, uri)

        def address(last_try: bool) -> str | None:
            for iface in agent.call("guest-network-get-interfaces") or []:
                if iface.get("name") == "lo":
                    continue
                for addr in iface.get("ip-addresses", []):
                    if addr.get("ip-address-type") == "ipv4" and addr.get("ip-address"):
                        return str(addr["ip-address"])
            if not last_try:
                return None
            raise errors.BootTimeout(
                f"{NAME}: machine {name!r} got no IPv4 address within {timeout:g}s",
                self.paths.console_tail(dom),
            )

        return poll_until(address, timeout=timeout, what=f"an address of {dom}", interval=0.1,
                          max_interval=0.2)  # fmt: skip

    def ready(
        self,
        dom: str,
        name: str,
        timeout: float,
        uri: str | None,
        net: str | None,
        restored: bool,
        ssh: Mapping[str, Any] | None = None,
        systemd: bool = False,
    ) -> str | None:
        """Agent up, hostname set, systemd up (``systemd``: a cold boot waits for
        ``systemctl is-system-running``), clock fixed (after a restore), IP and /etc/hosts.

        With ``ssh``: a DHCP lease and an SSH login instead of the agent (never restored).
        """
        if ssh:
            ip = self.channels.remote.ready(dom, name, timeout, ssh, uri)
            self.channels.set_hostname_ssh(dom, name, ip, ssh)
            if net:
                self._publish_hosts(net, dom, ip, uri)
            return ip
        started = time.monotonic()
        self.channels.wait_agent(dom, name, timeout, uri)
        self.channels.set_hostname(dom, name, uri)
        if systemd and not restored:  # a restored one was captured once it was running
            left = max(1.0, timeout - (time.monotonic() - started))
            self.channels.wait_systemd(dom, name, left, uri)
        if restored:
            # The restored clock is the snapshot's: set it, without waiting (guest-set-time
            # would run hwclock); a guest without `date -s` runs on with its clock behind.
            with contextlib.suppress(errors.VmenvError, AgentError, libvirt.libvirtError):
                self.channels.agent(dom, uri).spawn(
                    ["/bin/sh", "-c", f"date -s @{int(time.time())} >/dev/null 2>&1"],
                    capture=False,
                )
        if net is None:
            return None
        ip = self.wait_ip(dom, name, min(timeout, 60.0), uri)
        self._publish_hosts(net, dom, ip, uri)
        return ip

    def _publish_hosts(self, net: str, dom: str, ip: str, uri: str | None) -> None:
        """Record ``ip`` in ``dom``'s labels; write every member's /etc/hosts (names work)."""

        def members(conn: libvirt.virConnect) -> list[tuple[str, dict[str, str]]]:
            found = []
            for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                labels = read_labels(domain)
                if labels is None or labels.get("network") != net:
                    continue
                if domain.name() == dom:
                    labels["ip"] = ip
                    set_labels(domain, labels)
                found.append((domain.name(), labels))
            return found

        group = self.hv.call(members, uri)
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{labels['ip']} {labels.get('name', '')}\n" for _d, labels in group if labels.get("ip")
        )
        for member, labels in group:
            ssh = ssh_of(labels)
            if ssh is not None and not labels.get("ip"):
                continue  # not up yet: it writes everyone's file itself when it is
            runner = self.channels.runner(
                member, uri, ssh, labels.get("ip"), labels.get("name", "")
            )
            runner.write_file("/etc/hosts", hosts.encode())
