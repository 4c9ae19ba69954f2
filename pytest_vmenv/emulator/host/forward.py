"""Port forwards: a listener on the host's loopback relayed into a guest's network namespace.

``forward(ref, port)`` opens a TCP listener on ``127.0.0.1`` (an ephemeral port). Its thread
joins the guest's network namespace with ``setns(2)`` (that changes only the calling thread)
and, for each connection it accepts, makes a socket there (a socket keeps the namespace it was
made in), which a worker connects to ``127.0.0.1:port`` *inside the guest*: a service bound to
the guest's loopback or to ``0.0.0.0`` is reached, with or without ``network=``, and nothing
on the host ever connects to a guest address. The namespace comes from the guest's PID 1,
verified by pid and start time (:func:`.pids.pidfd`), and is opened again when the guest's
PID 1 changes, so a forward keeps working across a revert.

The bytes are pumped by one worker per direction (:mod:`.workers`: threads are reused); when
one side ends its stream, the other side's write half is shut (half-close passes through).
Listeners and relays live in the pytest process: :meth:`Forwards.close` (on destroy) and
:meth:`Forwards.close_all` (when the backend closes) stop them, and a crash of the process
takes them down with it.

Unprivileged, pytest may not ``setns`` into a guest's network namespace (that needs
CAP_SYS_ADMIN in its own user namespace too): a helper process in the guest's user and network
namespaces makes the sockets instead (:mod:`.netns_helper`), one per listener.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ... import errors
from ..syscalls import CLONE_NEWNET, setns
from .netns_helper import Helper
from .pids import pidfd, readable
from .record import Guest
from .state import NAME
from .userns import rootless
from .workers import Workers

__all__ = ["Forwards", "guest_ns"]

CONNECT_TIMEOUT = 10.0
"""Seconds a relay waits for the guest's service to accept (a loopback connect: at once)."""
_CHUNK = 256 * 1024


def guest_ns(guest: Guest, *kinds: str) -> list[int]:
    """fds of ``guest``'s namespaces ``kinds`` (``"net"``, ``"user"``), opened through /proc of
    its verified PID 1, or unprivileged of its keeper (in the same namespaces; PID 1 is not
    dumpable, so only root may open its /proc files).

    The pidfd is checked against the recorded start time first, and the process is checked
    still alive after the namespaces were opened: the fds are that guest's, never a reused
    pid's.
    """
    pid, start = (guest.keeper, guest.keeper_start) if rootless() else (guest.pid, guest.pid_start)
    fd = pidfd(pid, start)
    if fd < 0:
        raise errors.MachineGone(f"{NAME}: machine {guest.name!r} is not running")
    opened: list[int] = []
    try:
        for kind in kinds:
            opened.append(os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
        if readable(fd, 0):
            raise errors.MachineGone(f"{NAME}: machine {guest.name!r} stopped")
    except BaseException:
        for ns in opened:
            os.close(ns)
        raise
    finally:
        os.close(fd)
    return opened


def _socket_in(netns: int) -> socket.socket:
    """A TCP socket made in the namespace ``netns``; the calling thread stays in it."""
    setns(netns, CLONE_NEWNET)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Netns:
    """The guest's network namespace as an fd (unprivileged: a :class:`.netns_helper.Helper`
    in it), opened again only when its PID 1 changed (a revert starts a new one); used by one
    thread, the listener's."""

    def __init__(self, guest: Callable[[], Guest]) -> None:
        self.guest = guest
        self.fd = -1
        self.key: tuple[int, str] = (0, "")
        self.joined = -1
        self.helper: Helper | None = None

    def socket(self) -> socket.socket:
        """A socket in the guest's namespace; as root the calling thread joins it (once per
        namespace), unprivileged the helper makes it."""
        guest = self.guest()
        if (guest.pid, guest.pid_start) != self.key:
            self.close()
            if rootless():
                self.helper = Helper(*guest_ns(guest, "user", "net"))
            else:
                self.fd = guest_ns(guest, "net")[0]
            self.key = (guest.pid, guest.pid_start)  # a revert changes it (and the keeper)
        if self.helper is not None:
            return self.helper.socket()
        if self.joined != self.fd:
            self.joined = -1
            sock = _socket_in(self.fd)
            self.joined = self.fd
            return sock
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if self.helper is not None:
            self.helper.close()
        self.fd, self.joined, self.helper, self.key = -1, -1, None, (0, "")


@dataclass(eq=False)
class _Pair:
    """One relayed connection: the last of its two pumps to end closes both sockets."""

    client: socket.socket
    upstream: socket.socket
    done: Callable[[_Pair], None]
    pumps: int = 2
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy ``src`` to ``dst`` until EOF (then shut ``dst``'s write half) or an error."""
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.cut()
        with self.lock:
            self.pumps -= 1
            last = self.pumps == 0
        if last:
            self.close()

    def close(self) -> None:
        self.client.close()
        self.upstream.close()
        self.done(self)

    def cut(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@dataclass
class _Forward:
    """One listener and the connections it relays."""

    listener: socket.socket
    port: int
    netns: _Netns
    workers: Workers
    live: set[_Pair] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        name = f"vmenv-forward-{self.port}"
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def _accept(self) -> None:
        """Accept, make the upstream socket in the guest (this thread joins its netns), and
        hand the pair to a worker that connects it."""
        netns = self.netns
        try:
            while True:
                try:
                    client, _ = self.listener.accept()
                except OSError:
                    return
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    upstream = netns.socket()
                except (OSError, errors.VmenvError):
                    client.close()  # the guest is gone: the client sees its connection close
                    continue
                pair = _Pair(client, upstream, self._forget)
                with self.lock:
                    closed = self.closed
                    if not closed:
                        self.live.add(pair)
                if closed:
                    pair.close()
                    return
                self.workers.run(functools.partial(self._connect, pair))
        finally:
            netns.close()

    def _connect(self, pair: _Pair) -> None:
        try:
            pair.upstream.settimeout(CONNECT_TIMEOUT)
            pair.upstream.connect(("127.0.0.1", self.port))
            pair.upstream.settimeout(None)
        except OSError:
            pair.close()  # the guest refused: so does the relay, by closing
            return
        self.workers.run(functools.partial(pair.pump, pair.upstream, pair.client))
        pair.pump(pair.client, pair.upstream)

    def _forget(self, pair: _Pair) -> None:
        with self.lock:
            self.live.discard(pair)

    def close(self) -> None:
        """Stop accepting (the port then refuses) and cut every relayed connection."""
        with self.lock:
            self.closed = True
            live, self.live = list(self.live), set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self.listener.close()
        for pair in live:
            pair.cut()


class Forwards:
    """Every forward of one backend instance, by guest id; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_guest: dict[str, dict[tuple[int, str], _Forward]] = {}
        self._workers = Workers("vmenv-relay")

    def forward(
        self, gid: str, port: int, host: str, guest: Callable[[], Guest]
    ) -> tuple[str, int]:
        """Listen on ``host`` (an ephemeral port) and relay to ``port`` in the guest that
        ``guest()`` gives (its current record: it raises once the guest is gone); the same
        ``(port, host)`` again gives the same address. A first socket is made in the guest
        here, so a forward that cannot work fails now rather than at each connection."""
        if not 0 < port < 65536:
            raise errors.ConfigError(f"forward: port must be 1..65535, got {port!r}")
        with self._lock:
            known = self._by_guest.get(gid, {}).get((port, host))
            if known is not None:
                return known.address
        netns = self._probe(guest)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listener = socket.create_server((host, 0), family=family, backlog=128)
        except BaseException:
            netns.close()
            raise
        fwd = _Forward(listener, port, netns, self._workers)
        with self._lock:
            mine = self._by_guest.setdefault(gid, {})
            known = mine.setdefault((port, host), fwd)
        if known is not fwd:
            listener.close()
            netns.close()
            return known.address
        fwd.start()
        return fwd.address

    @staticmethod
    def _probe(guest: Callable[[], Guest]) -> _Netns:
        """The guest's namespace, opened and tried (a socket made in it) in a thread of its
        own, so that this one never joins it; the listener's thread goes on with it."""
        netns = _Netns(guest)
        failure: list[BaseException] = []

        def make() -> None:
            try:
                netns.socket().close()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=make, name="vmenv-forward-probe")
        thread.start()
        thread.join()
        netns.joined = -1  # that thread joined it, the listener's has not
        if failure:
            netns.close()
            raise failure[0]
        return netns

    def close(self, gid: str) -> None:
        """Close every forward of guest ``gid`` (its ports refuse from now on)."""
        with self._lock:
            mine = self._by_guest.pop(gid, {})
        for fwd in mine.values():
            fwd.close()

    def close_all(self) -> None:
        with self._lock:
            gids = list(self._by_guest)
        for gid in gids:
            self.close(gid)
