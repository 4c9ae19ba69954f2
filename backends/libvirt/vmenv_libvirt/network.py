"""Isolated libvirt networks, one per environment instance (``network="lan"``).

Contract: :meth:`Networks.ensure` returns the libvirt network of the network the
orchestrator handed us (a :class:`~pytest_vmenv.backend.Network`), creating it on first
use: no ``<forward>`` (nothing leaves the segment), a private /24 (the CIDR given, else a free
one in 10.200.0.0/13 that no libvirt network and no host route uses), DHCP with dnsmasq's
``no-ping``. Networks are transient (``networkCreateXML``): nothing to undefine, and a
libvirtd restart cannot resurrect a stale one. Its name carries a hash of session and
instance, so :meth:`Networks.release` (called when a machine is destroyed) removes it once no
domain of ours uses it. Nothing else of the host's networking is touched.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import Network
from pytest_vmenv.ledger import flocked

from .config import Paths
from .connection import NAME, Hypervisor, is_gone
from .domains import read_labels, render

__all__ = ["Networks"]

_POOL = ipaddress.IPv4Network("10.200.0.0/13")


def _host_routes() -> list[ipaddress.IPv4Network]:
    """The host's routed IPv4 subnets (read-only, from /proc/net/route)."""
    nets = []
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                dest, mask = int(parts[1], 16), int(parts[7], 16)
                if mask:
                    addr = ipaddress.IPv4Address(dest.to_bytes(4, "little"))
                    nets.append(
                        ipaddress.IPv4Network(f"{addr}/{bin(mask).count('1')}", strict=False)
                    )
    except (OSError, ValueError, IndexError):
        pass
    return nets


class Networks:
    """The environment networks of one backend instance (see the module docstring)."""

    def __init__(self, hv: Hypervisor, paths: Paths) -> None:
        self.hv = hv
        self.paths = paths

    @property
    def lock_path(self) -> Path:
        return self.paths.root / "networks.lock"

    @staticmethod
    def name_of(network: Network, session: str) -> str:
        """The libvirt network's name: a hash of ``session`` and the network's id."""
        digest = hashlib.sha256(f"{session}\0{network.id}".encode()).hexdigest()[:10]
        return f"vmenv-{digest}"

    def ensure(self, network: Network, session: str) -> str:
        """The libvirt network for ``network`` in ``session``, created if it does not exist."""
        name = self.name_of(network, session)
        cidr = network.subnet
        with flocked(self.lock_path):

            def make(conn: libvirt.virConnect) -> None:
                try:
                    net = conn.networkLookupByName(name)
                    if not net.isActive():
                        net.create()
                    return
                except libvirt.libvirtError as exc:
                    if not is_gone(exc):
                        raise
                subnet = self._subnet(conn, cidr)
                hosts = list(subnet.hosts())
                xml = render(
                    "network.xml.j2",
                    name=name,
                    bridge="vmbr" + name[6:],
                    domain=name,
                    gateway=str(hosts[0]),
                    netmask=str(subnet.netmask),
                    first=str(hosts[1]),
                    last=str(hosts[-1]),
                )
                conn.networkCreateXML(xml)

            self.hv.call(make)
        return name

    def _subnet(self, conn: libvirt.virConnect, cidr: str | None) -> ipaddress.IPv4Network:
        used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = list(_host_routes())
        for net in conn.listAllNetworks(0):
            for addr, mask in re.findall(
                r"<ip[^>]*address=['\"]([\d.]+)['\"][^>]*netmask=['\"]([\d.]+)['\"]",
                net.XMLDesc(0),
            ):
                used.append(ipaddress.ip_network(f"{addr}/{mask}", strict=False))
        if cidr is not None:
            try:
                wanted = ipaddress.IPv4Network(cidr, strict=False)
            except ValueError:
                wanted = ipaddress.IPv4Network("0.0.0.0/32")
            if wanted.num_addresses < 8:
                raise errors.ConfigError(
                    f"{NAME}: network {cidr!r}: give an IPv4 subnet of at least /29"
                )
            clash = [str(n) for n in used if n.overlaps(wanted)]
            if clash:
                raise errors.BackendError(
                    f"{NAME}: network {cidr} overlaps {', '.join(clash)} on this host; "
                    "choose another subnet"
                )
            return wanted
        for candidate in _POOL.subnets(new_prefix=24):
            if not any(n.overlaps(candidate) for n in used):
                return candidate
        raise errors.BackendError(f"{NAME}: no free /24 left in {_POOL} for a private network")

    def release(self, name: str) -> None:
        """Remove network ``name`` if no domain of ours is on it any more (idempotent)."""
        with flocked(self.lock_path):

            def drop(conn: libvirt.virConnect) -> None:
                for dom in conn.listAllDomains(0):
                    labels = read_labels(dom)
                    if labels is not None and labels.get("network") == name:
                        return
                try:
                    conn.networkLookupByName(name).destroy()
                except libvirt.libvirtError as exc:
                    if not is_gone(exc):
                        raise

            self.hv.call(drop)
