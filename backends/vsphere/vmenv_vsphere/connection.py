"""One vCenter login per process, re-login on ``NotAuthenticated``, bounded task waits.

:func:`connect` returns the process's :class:`Connection` for a server and user: xdist workers
each log in once, however many backend objects they make. ``Connection.call(fn)`` runs ``fn``
and, when the session has expired or was terminated server-side (``NotAuthenticated``), logs
in again on the same stub (so every managed object already held keeps working) and retries,
a bounded number of times (tenacity). :meth:`Connection.wait` polls a task up to a deadline
and maps its fault to :mod:`pytest_vmenv.errors` with the fault's own message.

Certificates are verified (the system store, or ``ca_file``). ``insecure`` turns that off,
with one warning per process. The password is passed straight from its :class:`Secret` to
the login call and is never logged; a failed login raises ``BackendUnavailable`` naming the
user and server only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from pytest_vmenv import errors

from .config import VsphereConfig

__all__ = ["Connection", "connect", "fault_message", "map_fault", "unreachable"]

log = logging.getLogger("vmenv.vsphere")
_T = TypeVar("_T")
_LOCK = threading.Lock()
_CONNECTIONS: dict[tuple[int, str, str], Connection] = {}
_WARNED_INSECURE: set[str] = set()


def fault_message(fault: BaseException | Any) -> str:
    """The human part of a vSphere fault (``msg``, else its type name)."""
    msg = getattr(fault, "msg", None) or getattr(fault, "localizedMessage", None)
    name = type(fault).__name__.rsplit(".", 1)[-1]
    return f"{name}: {msg}" if msg else name


def map_fault(fault: BaseException | Any, what: str) -> errors.VmenvError:
    """A vSphere fault as the design's error: gone objects are :class:`MachineGone`."""
    text = f"vsphere: {what}: {fault_message(fault)}"
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound | vim.fault.NotFound):
        return errors.MachineGone(text)
    if isinstance(fault, vim.fault.InvalidLogin | vim.fault.NoPermission):
        return errors.BackendUnavailable("vsphere", text.removeprefix("vsphere: "))
    return errors.BackendError(text)


def unreachable(config: VsphereConfig, exc: OSError) -> str:
    """One line for a server that cannot be reached at all (nothing listens, no route, DNS).

    The URL and where it came from, so a stale ``GOVC_URL`` (a simulator that was stopped)
    is recognised at once instead of as a socket traceback.
    """
    if isinstance(exc, ConnectionRefusedError):
        why = "connection refused (nothing listens there: is the server running?)"
    elif isinstance(exc, TimeoutError):
        why = "the connection timed out"
    else:
        why = exc.strerror or str(exc) or type(exc).__name__
    return (
        f"cannot reach vSphere at {config.url}: {why}; the address comes from "
        "[backends.vsphere] host or GOVC_URL"
    )


class Connection:
    """A logged-in service instance, shared by every backend object of this process."""

    def __init__(self, config: VsphereConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.si: Any = None
        self.users = 0

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS rules for this server (the API and guest file transfers alike)."""
        if self.config.insecure:
            if self.config.host not in _WARNED_INSECURE:
                _WARNED_INSECURE.add(self.config.host)
                log.warning(
                    "vsphere: certificate verification is OFF for %s (insecure = true / "
                    "GOVC_INSECURE): anyone on the path can read the credentials",
                    self.config.host,
                )
            ctx = ssl._create_unverified_context()
        else:
            ctx = ssl.create_default_context(cafile=self.config.ca_file)
        return ctx

    def login(self) -> None:
        """Log in (first use) or again on the same stub (after ``NotAuthenticated``)."""
        cfg = self.config
        where = f"{cfg.user or '(no user)'}@{cfg.host}:{cfg.port}"
        try:
            if self.si is None:
                self.si = SmartConnect(
                    host=cfg.host, port=cfg.port, user=cfg.user, pwd=cfg.password.reveal(),
                    sslContext=self.ssl_context(), connectionPoolTimeout=-1,
                )  # fmt: skip
            else:
                self.si.content.sessionManager.Login(cfg.user, cfg.password.reveal(), None)
        except vim.fault.InvalidLogin:
            raise errors.BackendUnavailable(
                "vsphere", f"login as {where} failed: incorrect user name or password"
            ) from None
        except ssl.SSLError as exc:
            raise errors.BackendUnavailable(
                "vsphere",
                f"TLS to {cfg.host}:{cfg.port} failed: {exc.reason or exc} (set ca_file to the "
                "server's CA bundle, or insecure = true to skip verification)",
            ) from None
        except OSError as exc:
            raise errors.BackendUnavailable("vsphere", unreachable(cfg, exc)) from None
        except vmodl.MethodFault as exc:
            raise errors.BackendUnavailable(
                "vsphere", f"cannot log in as {where}: {fault_message(exc)}"
            ) from None
        log.debug("vsphere: logged in as %s", where)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``; on ``NotAuthenticated`` log in again and retry (at most twice)."""
        if self.si is None:
            with self._lock:
                if self.si is None:
                    self.login()
        for attempt in Retrying(
            retry=retry_if_exception_type(vim.fault.NotAuthenticated),
            stop=stop_after_attempt(3),
            wait=wait_fixed(0.1),
            reraise=True,
        ):
            with attempt:
                try:
                    return fn()
                except vim.fault.NotAuthenticated:
                    log.info("vsphere: session expired or was terminated; logging in again")
                    with self._lock:
                        self.login()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def stub(self) -> Any:
        """The SOAP stub managed-object references are bound to (logs in on first use)."""
        if self.si is None:
            self.call(lambda: None)
        return self.si._stub

    @property
    def content(self) -> Any:
        return self.si.content

    def wait(self, task: Any, what: str, timeout: float | None = None) -> Any:
        """Wait for ``task`` at most ``timeout`` (default ``task_timeout``) seconds."""
        deadline = time.monotonic() + (timeout or self.config.task_timeout)
        delay = 0.02
        while True:
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                raise map_fault(info.error, what)
            if time.monotonic() + delay > deadline:
                raise errors.BackendError(
                    f"vsphere: {what}: the task did not finish within "
                    f"{timeout or self.config.task_timeout:g}s (task {task._moId} still "
                    f"{info.state}; see the vSphere client's Recent Tasks)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def close(self) -> None:
        si, self.si = self.si, None
        if si is not None:
            with contextlib.suppress(Exception):
                Disconnect(si)


def connect(config: VsphereConfig) -> Connection:
    """The process's connection for ``config``'s server and user (made on first use)."""
    key = (os.getpid(), f"{config.host}:{config.port}", config.user)
    with _LOCK:
        conn = _CONNECTIONS.get(key)
        if conn is None or conn.config != config:
            conn = _CONNECTIONS[key] = Connection(config)
        conn.users += 1
        return conn


def release(conn: Connection) -> None:
    """Drop one user of ``conn``; the last one logs out."""
    with _LOCK:
        conn.users -= 1
        if conn.users > 0:
            return
        for key, value in list(_CONNECTIONS.items()):
            if value is conn:
                del _CONNECTIONS[key]
    conn.close()
