"""``vm.forward`` on libvirt: QEMU user-mode networking's ``hostfwd``, added while it runs.

Every domain has a second NIC (``templates/domain.xml.j2``): ``-netdev user,id=vmenvfwd,
restrict=on`` on a virtio-net device with the fixed MAC :data:`MAC` at a fixed PCI slot, so a
RAM-state clone restores onto the same device list. ``restrict=on`` isolates it: the guest
reaches neither the host (``10.0.2.2``) nor anything outside through it; only forwarding rules
set from the host pass. The guest gives that NIC :data:`GUEST_ADDRESS`/24 and no route (the
tiny image's ``rcS``, the Debian image's ``40-vmenv-forward.network``), so the ``network=``
NIC and its DHCP are untouched.

:meth:`Forwards.forward` picks a free port on ``host`` (the loopback by default) and adds
``hostfwd_add vmenvfwd tcp:HOST:PORT-:GUESTPORT`` through the QEMU monitor (HMP): QEMU itself
listens there and connects to ``10.0.2.15:GUESTPORT`` inside the guest's user-mode stack; the
host never connects to a guest LAN address. A port taken between the probe and the rule is
retried. The rule dies with the domain (``destroy``); a rule is remembered per domain, port
and host, so the same ask gives the same address.

Limitation (unlike the emulator): the guest sees the connection arrive on ``10.0.2.15``, so a
guest service bound only to ``127.0.0.1`` is not reached; bind it to ``0.0.0.0`` (or
``10.0.2.15``).
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import libvirt  # type: ignore[import-untyped]
import libvirt_qemu  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef

from .connection import NAME, Hypervisor

__all__ = ["GUEST_ADDRESS", "MAC", "NETDEV", "Forwards"]

NETDEV = "vmenvfwd"
MAC = "52:54:00:76:6d:66"
GUEST_ADDRESS = "10.0.2.15"
_ATTEMPTS = 8


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (it may be taken before QEMU binds it: retried)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Forwards:
    """The forwards of this process's machines, by (domain, guest port, host). Thread-safe."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._known: dict[tuple[str, int, str], tuple[str, int]] = {}
        self._lock = threading.Lock()

    def forward(self, ref: MachineRef, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """``(host, hostport)`` that reaches ``GUEST_ADDRESS:port`` in ``ref``'s guest."""
        try:
            host = str(ipaddress.ip_address(host))  # nothing else goes into the HMP command
        except ValueError:
            raise errors.ConfigError(
                f"{NAME}: forward host={host!r} is not an IP address"
            ) from None
        key = (ref.id, int(port), host)
        with self._lock:
            if key in self._known:
                return self._known[key]
            last = ""
            for _ in range(_ATTEMPTS):
                hostport = _free_port(host)
                bracketed = f"[{host}]" if ":" in host else host
                rule = f"tcp:{bracketed}:{hostport}-:{port}"
                last = self._monitor(ref, f"hostfwd_add {NETDEV} {rule}")
                if not last.strip():
                    self._known[key] = (host, hostport)
                    return host, hostport
            raise errors.BackendError(
                f"{NAME}: machine {ref.name!r}: QEMU refused a forward of port {port} on "
                f"{host} after {_ATTEMPTS} tries: {last.strip()!r} (is the domain from a "
                "domain_xml without the vmenvfwd NIC? see backends/libvirt/README.md)"
            )

    def forget(self, dom: str) -> None:
        """Drop the remembered forwards of ``dom`` (destroyed: QEMU's rules went with it)."""
        with self._lock:
            for key in [k for k in self._known if k[0] == dom]:
                del self._known[key]

    def _monitor(self, ref: MachineRef, command: str) -> str:
        def run(conn: libvirt.virConnect) -> str:
            try:
                domain = conn.lookupByName(ref.id)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise errors.MachineGone(
                        f"{NAME}: machine {ref.name!r} ({ref.id}) is gone"
                    ) from e
                raise
            flag = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            return str(libvirt_qemu.qemuMonitorCommand(domain, command, flag))

        return self.hv.call(run, ref.data.get("uri"))
