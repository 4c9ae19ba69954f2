"""Wires guests to private LANs and keeps their ``/etc/hosts`` current.

As root a LAN is a Linux bridge in a namespace of its own (:mod:`.bridge`); unprivileged, a
userspace switch over packet sockets on veths made inside each guest's own namespace
(:mod:`.userlan`): veths cannot join namespaces of sibling user namespaces.

Machines on one :class:`~pytest_vmenv.backend.Network` (equal ``id``) share one
:class:`~.bridge.Lan`, made on the first attach and closed when its last member leaves. After
every attach, each member's ``/etc/hosts`` is rewritten through its PID 1 (so the write is
confined to the guest's root) to list every member's name and address.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .record import Guest

__all__ = ["DEFAULT_CIDR", "Networks"]

DEFAULT_CIDR = "10.77.0.0/24"


@dataclass
class _Segment:
    lan: Any
    members: set[str] = field(default_factory=set)


class Networks:
    """All LANs of one backend instance, keyed by the orchestrator's network id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: dict[str, _Segment] = {}

    def available(self) -> bool:
        try:
            from . import bridge  # noqa: F401
        except ImportError:
            return False
        return shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") is not None

    def attach(self, guest: Guest, everyone: list[Guest], state_dir: Path) -> None:
        """Give ``guest`` an address on its network and refresh every member's hosts file."""
        from .bridge import Lan
        from .forward import guest_ns
        from .userlan import UserLan
        from .userns import rootless

        network = guest.network
        assert network is not None
        with self._lock:
            seg = self._segments.get(network.id)
            if seg is None:
                records = state_dir / "emulator" / "networks"
                records.mkdir(parents=True, exist_ok=True)
                cidr = network.subnet or DEFAULT_CIDR
                seg = _Segment(UserLan(cidr) if rootless() else Lan(cidr, state_dir=records))
                self._segments[network.id] = seg
            if isinstance(seg.lan, UserLan):  # it makes the veths from inside the guest
                guest.ip = seg.lan.attach(guest.pid, *guest_ns(guest, "user", "net"))
            else:
                guest.ip = seg.lan.attach(guest.pid)
            seg.members.add(guest.id)
            guest.save()
            members = [g for g in everyone if g.id in seg.members and g.conn is not None]
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{g.ip}\t{g.name}" for g in sorted(members, key=lambda g: g.name) if g.ip]
        text = "\n".join(lines) + "\n"
        for member in members:
            if member.conn is not None:
                member.conn.request(
                    {"op": "write", "path": "/etc/hosts", "data": text, "mode": 0o644}
                )

    def detach(self, guest: Guest) -> None:
        """Take ``guest`` off its network (closing the LAN with its last member)."""
        if guest.network is None:
            return
        with self._lock:
            seg = self._segments.get(guest.network.id)
            if seg is None or guest.id not in seg.members:
                return
            seg.members.discard(guest.id)
            try:
                if guest.pid:
                    seg.lan.detach(guest.pid)
            finally:
                if not seg.members:
                    del self._segments[guest.network.id]
                    seg.lan.close()

    def close(self) -> None:
        with self._lock:
            segments, self._segments = list(self._segments.values()), {}
        for seg in segments:
            seg.lan.close()
