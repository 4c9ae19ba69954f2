"""One vCenter login per process, re-login on ``NotAuthenticated``, bounded task waits.

:func:`connect` returns the process's :class:`Connection` for a server and user: xdist workers
each log in once, however many backend objects they make. ``Connection.call(fn)`` runs ``fn``
and, when the session has expired or was terminated server-side (``NotAuthenticated``), logs
in again on the same stub (so every managed object already held keeps working) and retries,
a bounded number of times (tenacity). :meth:`Connection.wait` polls a task up to a deadline
and maps its fault to :mod:`pytest_vmenv.errors` with the fault's own message. A backend
object holds its use of the shared login as a :class:`Link`, which logs in on first use.

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
from collections.abc import Callable
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from pytest_vmenv import errors
from pytest_vmenv.poll import poll_until

from .config import VsphereConfig
from .faults import BOUNDARY, NAME, Server

__all__ = ["Connection", "Link", "connect", "release"]

log = logging.getLogger("vmenv.vsphere")
_T = TypeVar("_T")
_LOCK = threading.Lock()
_CONNECTIONS: dict[tuple[int, str, str], Connection] = {}
_WARNED_INSECURE: set[str] = set()


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
        with BOUNDARY.guard("log in", Server(cfg)):
            if self.si is None:
                self.si = SmartConnect(
                    host=cfg.host, port=cfg.port, user=cfg.user, pwd=cfg.password.reveal(),
                    sslContext=self.ssl_context(), connectionPoolTimeout=-1,
                )  # fmt: skip
            else:
                self.si.content.sessionManager.Login(cfg.user, cfg.password.reveal(), None)
        log.debug("vsphere: logged in as %s", Server(cfg).name)

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
        """Wait for ``task`` at most ``timeout`` (default ``task_timeout``) seconds.

        A task that fails raises its fault's mapped error (:data:`.faults.BOUNDARY`); one
        still running at the deadline a :class:`BackendError` naming it and its state.
        """
        limit = timeout or self.config.task_timeout

        def done(last_try: bool) -> tuple[Any] | None:
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return (info.result,)
            if info.state == vim.TaskInfo.State.error:
                with BOUNDARY.guard(what):
                    raise info.error
            if last_try:
                raise errors.BackendError(
                    f"vsphere: {what}: the task did not finish within {limit:g}s (task "
                    f"{task._moId} still {info.state}; see the vSphere client's Recent Tasks)"
                )
            return None

        (result,) = poll_until(done, timeout=limit, what=what, interval=0.02, max_interval=1.0)
        return result

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


class Link:
    """One backend object's use of the process's :class:`Connection`, made on first use.

    Constructing a backend contacts nothing; the first call that needs the server logs in
    (or joins this process's login), and :meth:`close` lets go of it again.
    """

    def __init__(self, config: VsphereConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        with self._lock:
            if self._conn is None:
                if not self.config.host:
                    raise errors.BackendUnavailable(
                        NAME, "no server configured: set host in [tool.vmenv.backends.vsphere] "
                        "or GOVC_URL",
                    )  # fmt: skip
                self._conn = connect(self.config)
            return self._conn

    def call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the logged-in connection (see :meth:`Connection.call`)."""
        return self.conn.call(fn)

    def wait(self, task: Any, what: str) -> Any:
        """The result of ``task``, waited for under the connection's bounds."""
        return self.conn.wait(task, what)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            release(conn)
