"""The libvirt connection(s): keepalive, bounded re-connect, and the error boundary.

Contract: :meth:`Hypervisor.call` runs ``fn(conn)`` on a live connection. When the connection
drops (libvirtd restarted, a socket closed under us), it re-opens it and runs ``fn`` again,
with tenacity bounded in attempts and time (default 6 tries within 30 s); ``fn`` must look its
objects up by name on the ``conn`` it is given (a ``virDomain`` dies with its connection).
What counts as a dropped connection is :func:`is_transient`: decided from libvirt's error
code *and* domain, because drivers report their own failures with the same codes (the network
driver's "Unable to find 'dnsmasq' binary" is a ``VIR_ERR_SYSTEM_ERROR``). Every other libvirt
error fails at once, with libvirt's own message. :func:`boundary` is the one place where
``libvirt.libvirtError`` and ``OSError`` become :mod:`pytest_vmenv.errors`.

A list of URIs is the scale-out path: :meth:`Hypervisor.roomiest` picks the host with the most
free memory for the next clone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import libvirt  # type: ignore[import-untyped]
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef

from .agent import AgentError
from .tiny import TinyBuildError

__all__ = ["NAME", "Hypervisor", "boundary", "is_gone", "is_transient", "silence"]

NAME = "libvirt"
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
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
        self.reconnects = 0

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
                self.reconnects += 1
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

    def roomiest(self) -> str:
        """The URI with the most free memory (the first one if there is only one)."""
        if len(self.uris) == 1:
            return self.uris[0]
        return max(self.uris, key=lambda u: self.call(lambda c: c.getFreeMemory(), u))

    def close(self) -> None:
        with self._lock:
            for uri in list(self._conns):
                self._drop(uri)


def boundary(func: _F) -> _F:
    """Map libvirt's and the OS's exceptions into :mod:`pytest_vmenv.errors`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.VmenvError:
            raise
        except libvirt.libvirtError as exc:
            ref = next((a for a in args if isinstance(a, MachineRef)), None)
            if ref is not None and is_gone(exc):
                raise errors.MachineGone(
                    f"{NAME}: machine {ref.name!r} ({ref.id}) is gone: {exc}"
                ) from exc
            if is_transient(exc):
                raise errors.BackendError(
                    f"{NAME}: {func.__name__}: the connection to libvirtd failed and did not "
                    f"come back in time: {exc}. Is libvirtd running (.ci/libvirt.sh start)?"
                ) from exc
            raise errors.BackendError(f"{NAME}: {func.__name__} failed: {exc}") from exc
        except AgentError as exc:
            raise errors.BackendError(f"{NAME}: {func.__name__}: guest agent: {exc}") from exc
        except TinyBuildError as exc:
            raise errors.BackendError(f"{NAME}: building the tiny image: {exc}") from exc
        except (OSError, ValueError, KeyError) as exc:
            raise errors.BackendError(f"{NAME}: {func.__name__} failed: {exc}") from exc

    return wrapper  # type: ignore[return-value]
