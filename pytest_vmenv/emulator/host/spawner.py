"""The host's handle on the zygote process (:mod:`..zygote`): start, restart, spawn, keep.

The zygote is started lazily, once per backend instance. If it dies in the middle of a
session (killed, OOM), the guests it forked die with it (``PR_SET_PDEATHSIG``) and the next
``spawn`` starts a new one: bounded by :data:`RESTARTS` attempts within :data:`RESTART_WINDOW`
seconds (tenacity), so a zygote that cannot start fails the clone with a clear error instead of
looping.

The zygote gets only the locale, ``PATH`` and ``PYTHON*`` variables of our environment, and
imports only the modules guests run (:mod:`..zygote` and what it imports): the packages'
``__init__`` modules, which pull in the host side and pytest, are not run in it (the
``guest`` package's is: it imports nothing). Every clone
forks the zygote twice (keeper, PID 1), and a fork's cost (page tables, copy-on-write faults
in the children) grows with the zygote's heap.

A zygote that holds kept guests outlives :meth:`Zygote.close` (see :mod:`..zygote`); its
:class:`subprocess.Popen` is parked in a module list and reaped later, so no warning about a
running child is raised and no zombie is left while this process lives on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tenacity

from .. import wire

__all__ = ["RESTARTS", "RESTART_WINDOW", "Zygote", "ZygoteGone"]

RESTARTS = 3
RESTART_WINDOW = 10.0
_PKG_PARENT = str(Path(__file__).resolve().parents[3])
_DETACHED: list[subprocess.Popen[bytes]] = []
# argv: the control fd, the package's dir. The two packages become bare namespaces (their
# __init__ not run), then the zygote is imported; gc.freeze: the children's collections never
# touch (and so never copy) the objects inherited from the zygote.
_BOOT = """import gc, sys, types
for name, sub in (("pytest_vmenv", ""), ("pytest_vmenv.emulator", "/emulator")):
    pkg = sys.modules[name] = types.ModuleType(name)
    pkg.__path__ = [sys.argv[2] + sub]
from pytest_vmenv.emulator import zygote
gc.freeze()
zygote.main()
"""
# What the zygote inherits of our environment: no more. Every guest's PID 1 is a fork of it,
# and a guest can make PID 1 read its own /proc/self/environ (a CI secret must not be there).
_ENV = ("PATH", "LANG", "LANGUAGE", "TZ")
_ENV_PREFIXES = ("LC_", "PYTHON")


class ZygoteGone(OSError):
    """The zygote exited (or was killed) before it answered."""


def _reap_detached() -> None:
    for proc in list(_DETACHED):
        if proc.poll() is not None:
            _DETACHED.remove(proc)


class Zygote:
    """The helper process that forks guests (started lazily; restarted if it died)."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._kept: set[int] = set()

    @property
    def pid(self) -> int | None:
        """The running zygote's pid (None before the first spawn)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def _start(self) -> socket.socket:
        _reap_detached()
        mine, theirs = wire.socketpair()
        env = {k: v for k, v in os.environ.items() if k in _ENV or k.startswith(_ENV_PREFIXES)}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PKG_PARENT, env.get("PYTHONPATH", "")) if p
        )
        self._log.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), f"{_PKG_PARENT}/pytest_vmenv"],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        theirs.close()
        self._sock = mine
        return mine

    def _drop(self) -> None:
        """Forget a dead zygote (lock held): close our end, reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        proc, self._proc = self._proc, None
        self._kept.clear()  # its kept guests died with it
        if proc is not None:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _call(
        self,
        msg: dict[str, Any],
        fds: list[int],
        start: bool,
        meanwhile: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """One request and its reply; ``meanwhile`` runs between the two (the reply is read
        even when it raises, so no stale answer is left for the next request)."""
        failed: BaseException | None = None
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:
                self._drop()
            if self._sock is None:
                if not start:
                    raise ZygoteGone("the emulator's zygote process is gone")
                sock = self._start()
            else:
                sock = self._sock
            try:
                wire.send(sock, msg, fds)
                if meanwhile is not None:
                    try:
                        meanwhile()
                    except BaseException as exc:  # noqa: BLE001 - raised below
                        failed = exc
                reply, _ = wire.recv(sock)
            except (BrokenPipeError, ConnectionError):
                reply = None
            if reply is None:
                self._drop()
                if failed is not None:
                    raise failed
                raise ZygoteGone("the emulator's zygote process exited")
        if failed is not None:
            raise failed
        if "error" in reply:
            raise OSError(str(reply["error"]))
        return reply

    def spawn(
        self,
        cfg: dict[str, Any],
        cgroups: list[str],
        ctl_fd: int,
        meanwhile: Callable[[], None] | None = None,
    ) -> int:
        """Fork a guest; returns its keeper's pid. Restarts a dead zygote (bounded).

        ``meanwhile`` runs once, while the zygote forks: the host makes the guest's cgroups
        then, and a keeper spawned with ``cfg["go"]`` waits for them (see :mod:`..zygote`).
        """
        pending = [meanwhile]

        def once() -> None:
            todo, pending[0] = pending[0], None
            if todo is not None:
                todo()

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(RESTARTS) | tenacity.stop_after_delay(RESTART_WINDOW),
            retry=tenacity.retry_if_exception_type(ZygoteGone),
            wait=tenacity.wait_fixed(0.05),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                reply = self._call(
                    {"op": "spawn", "cfg": cfg, "cgroups": cgroups},
                    [ctl_fd],
                    start=True,
                    meanwhile=once,
                )
        return int(reply["pid"])

    def keep(self, keeper: int) -> None:
        """Let ``keeper`` (and its guest) outlive our end of the socket."""
        self._call({"op": "keep", "pid": keeper}, [], start=False)
        self._kept.add(keeper)

    def close(self) -> None:
        """Hang up: the zygote kills its non-kept guests and exits once no kept one is left."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            proc, self._proc = self._proc, None
            if proc is None:
                return
            if self._kept:
                _DETACHED.append(proc)  # lives on for its kept guests; reaped later
                return
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
