"""The libvirt connection(s): keepalive and bounded re-connect.

Contract: :meth:`Hypervisor.call` runs ``fn(conn)`` on a live connection. When the connection
drops (libvirtd restarted, a socket closed under us), it re-opens it and runs ``fn`` again,
with tenacity bounded in attempts and time (default 6 tries within 30 s); ``fn`` must look its
objects up by name on the ``conn`` it is given (a ``virDomain`` dies with its connection).
What counts as a dropped connection is :func:`is_transient`: decided from libvirt's error
code *and* domain, because drivers report their own failures with the same codes (the network
driver's "Unable to find 'dnsmasq' binary" is a ``VIR_ERR_SYSTEM_ERROR``). Every other libvirt
error fails at once, with libvirt's own message (mapped by :data:`.faults.BOUNDARY`).
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import libvirt  # type: ignore[import-untyped]
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from pytest_vmenv import errors

__all__ = ["NAME", "Hypervisor", "is_gone", "is_transient", "silence"]

NAME = "libvirt"
_T = TypeVar("_T")
# The transport's error domains and the codes it reports a lost or refused connection with
_TRANSPORT = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_TRANSPORT_CODES = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INTERNAL_ERROR,
}
_DENIED = {errno.EACCES, errno.EPERM}
_event_loop_started = False
_event_lock = threading.Lock()


def silence() -> None:
    """Stop libvirt from printing every error to stderr: they are raised and mapped here."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread: keepalive needs one."""
    global _event_loop_started
    with _event_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="vmenv-libvirt-events", daemon=True).start()
        _event_loop_started = True


def is_gone(exc: libvirt.libvirtError) -> bool:
    """The object (domain, volume, network, snapshot) does not exist (or is not running)."""
    code = exc.get_error_code()
    if code in (
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_NO_STORAGE_VOL,
        libvirt.VIR_ERR_NO_NETWORK,
        libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    ):
        return True
    return code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in str(exc)


def is_transient(exc: BaseException) -> bool:
    """The connection to libvirtd dropped or is not back yet: worth re-connecting and retrying.

    That is a connection object that was closed (``VIR_ERR_INVALID_CONN``), or an error of the
    transport itself (domain ``VIR_FROM_RPC``/``VIR_FROM_REMOTE``): "Cannot recv data",
    "End of file while reading data", "client socket is closed", a keepalive timeout, "Failed
    to connect socket" while the daemon restarts, but not a socket it may not open (EACCES,
    EPERM). The same codes from a driver (a missing ``dnsmasq``, a disk or directory that does
    not exist) and every other code (invalid XML, no such object, operation denied) are the
    operation's own failure and are never retried.
    """
    if not isinstance(exc, libvirt.libvirtError):
        return False
    code = exc.get_error_code()
    if code == libvirt.VIR_ERR_INVALID_CONN:
        return True
    if exc.get_error_domain() not in _TRANSPORT or code not in _TRANSPORT_CODES:
        return False
    return not (code == libvirt.VIR_ERR_SYSTEM_ERROR and exc.get_int1() in _DENIED)


class Hypervisor:
    """Connections to one or more libvirt URIs, opened lazily and re-opened when dropped."""

    def __init__(self, uris: Sequence[str], attempts: int = 6, window: float = 30.0) -> None:
        silence()
        self.uris = list(uris)
        self.attempts = attempts
        self.window = window
        self._conns: dict[str, libvirt.virConnect] = {}
        self._lock = threading.Lock()

    def conn(self, uri: str | None = None) -> libvirt.virConnect:
        """A live connection to ``uri`` (default: the first), opened now if needed."""
        uri = uri or self.uris[0]
        with self._lock:
            conn = self._conns.get(uri)
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                self._drop(uri)
            _start_event_loop()
            conn = libvirt.open(uri)
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)
            self._conns[uri] = conn
            return conn

    def _drop(self, uri: str) -> None:
        conn = self._conns.pop(uri, None)
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _dropped(self, exc: BaseException, uri: str) -> bool:
        if not is_transient(exc):
            return False
        with self._lock:
            conn = self._conns.get(uri)
            try:
                alive = conn is not None and conn.isAlive()
            except libvirt.libvirtError:
                alive = False
            if alive:
                return False
            self._drop(uri)
        return True

    def call(self, fn: Callable[[libvirt.virConnect], _T], uri: str | None = None) -> _T:
        """``fn(conn)``, re-connecting (bounded) when the connection dropped under it."""
        target = uri or self.uris[0]
        retry = Retrying(
            retry=retry_if_exception(lambda e: self._dropped(e, target)),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.window),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            reraise=True,
        )
        for attempt in retry:
            with attempt:
                return fn(self.conn(target))
        raise AssertionError("unreachable")  # pragma: no cover

    def check(self) -> None:
        """Raise ``BackendUnavailable`` (with how to start it) unless libvirtd answers."""
        try:
            self.call(lambda c: c.getLibVersion())
        except libvirt.libvirtError as exc:
            raise errors.BackendUnavailable(
                NAME,
                f"cannot connect to {self.uris[0]}: {exc}. Start libvirtd (without systemd: "
                "`.ci/libvirt.sh start`, or `virtlogd -d; libvirtd -d`)",
            ) from None

    def close(self) -> None:
        with self._lock:
            for uri in list(self._conns):
                self._drop(uri)
