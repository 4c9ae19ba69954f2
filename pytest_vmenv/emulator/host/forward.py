"""Port forwards both ways between the host's loopback and a guest's network namespace.

``forward(ref, port)`` opens a TCP listener on ``127.0.0.1`` (an ephemeral port). Its thread
joins the guest's network namespace with ``setns(2)`` (that changes only the calling thread)
and, for each connection it accepts, makes a socket there (a socket keeps the namespace it was
made in), which a worker connects to ``127.0.0.1:port`` *inside the guest*: a service bound to
the guest's loopback or to ``0.0.0.0`` is reached, with or without ``network=``, and nothing
on the host ever connects to a guest address. The namespace comes from the guest's PID 1,
verified by pid and start time (:func:`.pids.pidfd`), and is opened again when the guest's
PID 1 changes, so a forward keeps working across a revert.

``expose(ref, port)`` is the mirror: a listener made in the guest's namespace (by a thread of
its own that joins it, and ends) on the guest's own ``127.0.0.1``, the same port number when
it is free there, else an ephemeral one; its accepting thread never joins a namespace, so the
socket it makes for each connection is the host's, connected to ``127.0.0.1:port`` on the
host. Only that one host port is reached, and only by the guest's own processes (its loopback;
a guest on ``network=`` has its LAN address too, but the listener is not on it).

Both are a :class:`.relay.Relay` (one copy loop: half-close, many connections, close). They
live in the pytest process: :meth:`Forwards.close` (on destroy) and :meth:`Forwards.close_all`
(when the backend closes) stop them, and a crash of the process takes them down with it.

Unprivileged, pytest may not ``setns`` into a guest's network namespace (that needs
CAP_SYS_ADMIN in its own user namespace too): a helper process in the guest's user and network
namespaces makes the sockets instead (:mod:`.netns_helper`), one per listener.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable

from ... import errors
from ..syscalls import CLONE_NEWNET, setns
from .netns_helper import Helper
from .pids import pidfd, readable
from .record import Guest
from .relay import Relay
from .state import NAME
from .userns import rootless
from .workers import Workers

__all__ = ["Forwards", "guest_ns"]

_Key = tuple[str, int, str]
"""A relay of one guest: ``("forward", port, host)`` or ``("expose", port, "")``."""


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
    return _tcp()


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
        return _tcp()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if self.helper is not None:
            self.helper.close()
        self.fd, self.joined, self.helper, self.key = -1, -1, None, (0, "")


def _tcp() -> socket.socket:
    """A TCP socket in the calling thread's namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _listen(sock: socket.socket, port: int) -> None:
    """Listen on ``127.0.0.1:port`` of ``sock``'s namespace, or an ephemeral port if taken."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        sock.bind(("127.0.0.1", 0))
    sock.listen(128)


class Forwards:
    """Every forward and exposed host port of one backend instance, by guest id; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_guest: dict[str, dict[_Key, Relay]] = {}
        self._workers = Workers("vmenv-relay")

    def relays(self, gid: str) -> list[Relay]:
        """The live relays of guest ``gid`` (none once it is destroyed)."""
        with self._lock:
            return list(self._by_guest.get(gid, {}).values())

    def _known(self, gid: str, key: _Key) -> tuple[str, int] | None:
        with self._lock:
            known = self._by_guest.get(gid, {}).get(key)
        return None if known is None else known.address

    def _add(self, gid: str, key: _Key, relay: Relay) -> tuple[str, int]:
        """Start ``relay`` unless another thread got there first (then close it): the
        address of the one that stays."""
        with self._lock:
            known = self._by_guest.setdefault(gid, {}).setdefault(key, relay)
        if known is not relay:
            relay.close()
            relay.after()
            return known.address
        relay.start()
        return relay.address

    def forward(
        self, gid: str, port: int, host: str, guest: Callable[[], Guest]
    ) -> tuple[str, int]:
        """Listen on ``host`` (an ephemeral port) and relay to ``port`` in the guest that
        ``guest()`` gives (its current record: it raises once the guest is gone); the same
        ``(port, host)`` again gives the same address. A first socket is made in the guest
        here, so a forward that cannot work fails now rather than at each connection."""
        _check(port, "forward")
        key = ("forward", port, host)
        if (known := self._known(gid, key)) is not None:
            return known
        netns, probe = self._probe(guest)
        probe.close()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listener = socket.create_server((host, 0), family=family, backlog=128)
        except BaseException:
            netns.close()
            raise
        relay = Relay(listener, port, netns.socket, self._workers, f"vmenv-forward-{port}")
        relay.after = netns.close
        return self._add(gid, key, relay)

    def expose(self, gid: str, port: int, guest: Callable[[], Guest]) -> tuple[str, int]:
        """Listen on the guest's ``127.0.0.1`` (``port`` when free there) and relay to
        ``127.0.0.1:port`` on the host: the address the guest's processes connect to. The
        same ``port`` again gives the same address."""
        _check(port, "expose_host_port")
        key = ("expose", port, "")
        if (known := self._known(gid, key)) is not None:
            return known
        relay = self._exposer(guest, port, port)
        return self._add(gid, key, relay)

    def reopen(self, gid: str, guest: Callable[[], Guest]) -> None:
        """After a revert (a new PID 1 in a new network namespace): every exposed port of
        ``gid`` listens again in the new namespace, on the same guest port when it is free
        there (``vm.expose_host_port`` then asks again: the address may have changed). If
        one cannot be made again, it is dropped and the error raised."""
        with self._lock:
            mine = self._by_guest.get(gid, {})
            old = [(key, relay) for key, relay in mine.items() if key[0] == "expose"]
        failures: list[BaseException] = []
        for key, relay in old:
            try:
                self._reopen(gid, key, relay, guest)
            except BaseException as exc:  # noqa: BLE001 - the first is raised after the rest
                failures.append(exc)
        if failures:
            raise failures[0]

    def _reopen(self, gid: str, key: _Key, relay: Relay, guest: Callable[[], Guest]) -> None:
        where = relay.address[1]
        relay.close()
        try:
            new = self._exposer(guest, relay.port, where)
        except BaseException:
            with self._lock:  # asking again makes a new one, or says why it cannot
                if self._by_guest.get(gid, {}).get(key) is relay:
                    del self._by_guest[gid][key]
            raise
        with self._lock:
            if self._by_guest.get(gid, {}).get(key) is relay:
                self._by_guest[gid][key] = new
                new.start()
                return
        new.close()  # destroyed meanwhile

    def _exposer(self, guest: Callable[[], Guest], port: int, where: int) -> Relay:
        """A relay (not started) from a listener on the guest's ``127.0.0.1:where`` (or an
        ephemeral port if taken) to the host's ``127.0.0.1:port``."""
        netns, listener = self._probe(guest)
        netns.close()  # the listener keeps the guest's namespace; nothing else is made there
        try:
            _listen(listener, where)
        except BaseException:
            listener.close()
            raise
        return Relay(listener, port, _tcp, self._workers, f"vmenv-expose-{port}")

    @staticmethod
    def _probe(guest: Callable[[], Guest]) -> tuple[_Netns, socket.socket]:
        """The guest's namespace and a socket made in it, in a thread of its own, so that
        this one never joins it (a forward's listener thread goes on with the namespace)."""
        netns = _Netns(guest)
        made: list[socket.socket] = []
        failure: list[BaseException] = []

        def make() -> None:
            try:
                made.append(netns.socket())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=make, name="vmenv-forward-probe")
        thread.start()
        thread.join()
        netns.joined = -1  # that thread joined it, the listener's has not
        if failure:
            netns.close()
            raise failure[0]
        return netns, made[0]

    def close(self, gid: str) -> None:
        """Close every relay of guest ``gid`` (its ports refuse from now on)."""
        with self._lock:
            mine = self._by_guest.pop(gid, {})
        for relay in mine.values():
            relay.close()

    def close_all(self) -> None:
        with self._lock:
            gids = list(self._by_guest)
        for gid in gids:
            self.close(gid)


def _check(port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise errors.ConfigError(f"{what}: port must be 1..65535, got {port!r}")
