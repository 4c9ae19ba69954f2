"""Private networks for unprivileged guests: a userspace L2 switch over packet sockets.

Unprivileged, :mod:`.bridge` cannot work: a veth pair cannot join two network namespaces
owned by sibling user namespaces (every guest has its own). The TAP design (``/dev/net/tun``
opened inside the guest's namespaces) needs ``/dev/net/tun`` usable by the caller, which
many hosts keep ``0600 root``. So each guest gets, inside its *own* network namespace, a veth
pair ``eth0`` (configured, the guest's interface) and ``sw0`` (no address, link up), made by
a short helper that joins the guest's user and network namespaces (as
:mod:`.netns_helper` does; the caller's uid is 0 there, so ``ip`` keeps its capabilities).
The helper then opens an ``AF_PACKET`` socket bound to ``sw0`` and passes it back over
``SCM_RIGHTS`` and exits: no helper process outlives the attach.

One thread per :class:`UserLan` (not per guest) moves frames between the sockets of its
members with ``selectors``: a learning MAC table, broadcast/multicast/unknown frames flooded.
Each socket has ``PACKET_VNET_HDR``: a frame comes with its virtio-net header (checksum still
to be done, GSO segment size) and goes out with it, so the guests' checksum and segmentation
offloads keep working end to end (without it a TCP segment's partial checksum would reach the
peer unfinished and be dropped), and a 64 KiB TCP super-frame crosses in one move. Queues are
the kernel's socket buffers (bounded); a frame that cannot be written at once is
dropped, as a switch does, and TCP recovers. ``close`` stops the thread and closes the
sockets; when pytest dies the sockets close with it, and the veths vanish with the guests'
namespaces. Nothing is created in the host's network namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import socket
import subprocess
import threading

from ...errors import BackendError
from .lanaddress import free_address, subnet
from .netns_helper import spawn

__all__ = ["UserLan"]

_TIMEOUT = 30.0
_FRAME = 65536 + 64
_VNET = 10  # struct virtio_net_hdr before each frame
_MACS = 1024  # learned addresses kept at most (frames to the others are flooded)
_TOOL_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"

_SCRIPT = r"""
import ctypes, os, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
chan, user, net = (int(a) for a in sys.argv[1:4])
script = sys.argv[4]
chan = socket.socket(fileno=chan)
def fail(msg):
    chan.sendall(("-" + msg).encode()[:4000])
    sys.exit(1)
for fd, kind in ((user, 0x10000000), (net, 0x40000000)):
    if libc.setns(fd, kind) != 0:
        fail("setns(%#x): %s" % (kind, os.strerror(ctypes.get_errno())))
    os.close(fd)
r = subprocess.run(["ip", "-batch", "-"], input=script, capture_output=True, text=True,
                   timeout=30, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "LC_ALL": "C"})
if r.returncode != 0:
    fail("ip -batch exited %d: %s" % (r.returncode, r.stderr.strip()))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind(("sw0", 0))
socket.send_fds(chan, [b"+"], [s.fileno()])
"""


def _config(address: ipaddress.IPv4Interface) -> str:
    return (
        "link add eth0 type veth peer name sw0\n"
        f"address add {address} dev eth0\n"
        "link set sw0 up\nlink set eth0 up\nlink set lo up\n"
    )


def _port_socket(user: int, net: int, address: ipaddress.IPv4Interface) -> socket.socket:
    """A packet socket on a new ``sw0`` in the namespaces ``user``/``net`` (fds, closed)."""
    ours, proc = spawn(_SCRIPT, user, net, _config(address))
    with ours:
        ours.settimeout(_TIMEOUT)
        try:
            msg, got, _, _ = socket.recv_fds(ours, 4096, 1)
        except TimeoutError:
            msg, got = b"-no answer within 30s", []
        try:
            _, err = proc.communicate(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if msg[:1] == b"+" and got:
        sock = socket.socket(fileno=got[0])
        sock.setblocking(False)
        return sock
    for fd in got:
        os.close(fd)
    why = msg[1:].decode(errors="replace") or err.decode(errors="replace").strip()
    hint = "; the guest already has an eth0 (on another network?)" if "File exists" in why else ""
    raise BackendError(f"cannot attach a guest to the private network: {why}{hint}")


class UserLan:
    """A private L2 segment for unprivileged guests; the interface of :class:`.bridge.Lan`
    except that :meth:`attach` takes the guest's user and network namespaces as fds."""

    def __init__(self, cidr: str = "10.77.0.0/24") -> None:
        network = subnet(cidr)
        self._network = network
        self._lock = threading.Lock()
        self._ports: dict[int, tuple[socket.socket, ipaddress.IPv4Address]] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"vmenv-lan-{cidr}", daemon=True)
        self._thread.start()

    @property
    def cidr(self) -> str:
        return str(self._network)

    def __repr__(self) -> str:
        return f"<UserLan {self.cidr} guests={len(self._ports)}>"

    def attach(self, guest_pid: int, user: int, net: int) -> str:
        """Give the guest (namespaces ``user``/``net``, fds that are closed) an ``eth0`` on
        this segment; ``guest_pid`` is only its key. Returns its address."""
        with self._lock:
            if self._closed:
                os.close(user)
                os.close(net)
                raise BackendError(f"the private network {self.cidr} is closed")
            if guest_pid in self._ports:
                os.close(user)
                os.close(net)
                raise BackendError(f"process {guest_pid} is already attached to {self.cidr}")
            address = self._free_address()
            prefix = ipaddress.IPv4Interface(f"{address}/{self._network.prefixlen}")
            sock = _port_socket(user, net, prefix)
            self._ports[guest_pid] = (sock, address)
            self._sel.register(sock, selectors.EVENT_READ, guest_pid)
            return str(address)

    def detach(self, guest_pid: int) -> None:
        """Take the guest off the segment; unknown or gone guests are fine."""
        with self._lock:
            port = self._ports.pop(guest_pid, None)
            if port is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(port[0])
                port[0].close()

    def close(self) -> None:
        """Stop the switch thread and close every port (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake_w.send(b"x")
        self._thread.join(timeout=_TIMEOUT)
        with self._lock:
            for sock, _ in self._ports.values():
                sock.close()
            self._ports.clear()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def __enter__(self) -> UserLan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _free_address(self) -> ipaddress.IPv4Address:
        return free_address(self._network, {address for _, address in self._ports.values()})

    def _run(self) -> None:
        macs: dict[bytes, int] = {}
        while not self._closed:
            try:
                events = self._sel.select(timeout=1.0)
            except (OSError, ValueError):
                return
            for key, _ in events:
                if key.data is None:
                    return
                self._forward(key.data, macs)

    def _forward(self, src: int, macs: dict[bytes, int]) -> None:
        with self._lock:
            port = self._ports.get(src)
            if port is None:
                return
            try:
                frame, addr = port[0].recvfrom(_FRAME)
            except BlockingIOError:
                return
            except OSError:  # the guest's namespace went away
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(port[0])
                return
            if len(frame) < _VNET + 14 or addr[2] == socket.PACKET_OUTGOING:
                return
            source = frame[_VNET + 6 : _VNET + 12]
            if source not in macs and len(macs) >= _MACS:  # a guest forging sources: relearn
                macs.clear()
            macs[source] = src
            dst = macs.get(frame[_VNET : _VNET + 6]) if not frame[_VNET] & 1 else None
            targets = [dst] if dst is not None else [p for p in self._ports if p != src]
            for pid in targets:
                out = self._ports.get(pid)
                if out is not None and pid != src:
                    with contextlib.suppress(OSError):
                        out[0].send(frame)
