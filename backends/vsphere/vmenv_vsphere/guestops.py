"""Commands and files through VMware Tools guest operations: no network path to the guest.

Used when SSH is not configured (no ``ssh_key``/``ssh_password``), the guest's Tools are
running and ``guest_user``/``guest_password`` are set. Everything goes through vCenter's
``GuestOperationsManager``: ``processManager.StartProgramInGuest`` runs a program,
``ListProcessesInGuest`` reports its exit code once it has ended, ``TerminateProcessInGuest``
stops it, and ``fileManager.InitiateFileTransferToGuest``/``FromGuest`` hand out one-shot
HTTPS URLs (on the ESXi host; a ``*`` host means the server we are connected to) that a file
is PUT to or fetched from. The URLs are verified exactly like the API connection: the system
store or ``ca_file``, and off only with ``insecure``.

StartProgramInGuest gives a program no stdin, stdout or stderr, so :meth:`GuestOpsChannel.execute`
works through files: it makes a private directory with ``CreateTemporaryDirectoryInGuest``,
uploads ``input`` there as ``i``, and starts the channel wrapper (:mod:`pytest_vmenv.channel`)
with that directory, which runs the command in its own session and process group (whose id
goes to ``pid``) with stdin from ``i`` (else ``/dev/null``) and stdout/stderr left in
``o``/``e``; the wrapper exits with the command's status (a signal N is 128+N, a missing
program 127). ``ListProcessesInGuest`` is polled, with a growing interval, until the
wrapper's ``endTime``/``exitCode`` appear; then both files are fetched (bytes, exactly as
written, up to ``max_output`` each: the transfer stops there and the file's size tells what
was dropped) and the directory removed. A background process left running does not hold
``execute`` open.

Timeouts: a command with ``timeout`` that passes it has its process group killed by a second
StartProgramInGuest (the wrapper's group kill, :data:`~pytest_vmenv.channel.KILL`), its
wrapper is stopped with ``TerminateProcessInGuest`` if it still runs, and
:class:`CommandTimeout` is raised. Without a ``timeout`` the poll is still bounded, by
``task_timeout`` (600 s by default).

The guest password is a :class:`~.config.Secret`; a ``NamePasswordAuthentication`` is built
inline for each call and never kept, logged or put in a message. Faults become
:mod:`pytest_vmenv.errors` with what to do about them (:data:`.faults.BOUNDARY`).
"""

from __future__ import annotations

import http.client
import logging
import shlex
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pyVmomi import vim

from pytest_vmenv import errors
from pytest_vmenv.backend import GET_LIMIT, OUTPUT_LIMIT, Output, Result
from pytest_vmenv.channel import KILL, Delivery, RunDir, Stdin, Wrapper, as_user, local_copy
from pytest_vmenv.poll import poll_until

from .config import Secret
from .connection import Connection
from .faults import BOUNDARY, Guest

__all__ = ["KILL", "WRAPPER", "GuestOpsChannel"]


class _StillRunning(Exception):
    """The command had not ended by its deadline (only :meth:`GuestOpsChannel._wait` raises
    it, so no other timeout is mistaken for it)."""

log = logging.getLogger("vmenv.vsphere")
_T = TypeVar("_T")

WRAPPER = Wrapper(RunDir.GIVEN, Stdin.NULL, Delivery.FILES)


class GuestOpsChannel:
    """Commands and files for one VM through guest operations (see the module docstring).

    ``conn`` is the process's :class:`~.connection.Connection` (re-login, TLS rules);
    ``vm`` the VirtualMachine; ``max_wait`` bounds a command that has no ``timeout``.
    """

    def __init__(
        self, conn: Connection, vm: Any, user: str, password: Secret, *, machine: str = "",
        max_wait: float = 600.0, http_timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self._conn = conn
        self._vm = vm
        self.user = user
        self._password = password
        self.machine = machine or str(getattr(vm, "_moId", vm))
        self.max_wait = max_wait
        self.http_timeout = http_timeout

    def __repr__(self) -> str:
        return f"<GuestOpsChannel {self.user}@{self.machine}>"

    # -- API calls ----------------------------------------------------------------------------
    def _auth(self) -> Any:
        return vim.vm.guest.NamePasswordAuthentication(
            username=self.user, password=self._password.reveal(), interactiveSession=False
        )

    def _api(self, what: str, fn: Callable[[Any, Any], _T]) -> _T:
        """``fn(guestOperationsManager, vm)`` with re-login; faults mapped (``what`` failed)."""
        target = Guest(self.machine, str(getattr(self._vm, "_moId", "")), self.user)
        with BOUNDARY.guard(what, target):
            return self._conn.call(lambda: fn(self._conn.content.guestOperationsManager, self._vm))

    def _start(self, argv: Sequence[str]) -> int:
        spec = vim.vm.guest.ProcessManager.ProgramSpec(
            programPath=argv[0], arguments=shlex.join(argv[1:])
        )
        return int(self._api(
            "start a program (StartProgramInGuest)",
            lambda g, vm: g.processManager.StartProgramInGuest(vm, self._auth(), spec),
        ))  # fmt: skip

    def _status(self, pid: int) -> int | None:
        """The exit code of ``pid`` once it has ended, else None."""
        infos = self._api(
            "poll a program (ListProcessesInGuest)",
            lambda g, vm: g.processManager.ListProcessesInGuest(vm, self._auth(), [pid]),
        )
        info = next((i for i in infos or () if int(i.pid) == pid), None)
        if info is None:
            raise errors.BackendError(
                f"vsphere: {self.machine}: process {pid} vanished from the guest's process "
                "list (did the guest reboot or VMware Tools restart?)"
            )
        return None if info.endTime is None else int(info.exitCode or 0)

    def _wait(self, pid: int, deadline: float) -> int | None:
        """Poll ``pid`` until it ends (its exit code) or ``deadline`` passes (None)."""
        try:
            return poll_until(
                lambda _last_try: self._status(pid),
                timeout=max(0.0, deadline - time.monotonic()),
                what=f"process {pid} in {self.machine}",
                interval=0.01,
                max_interval=0.5,
                error=_StillRunning,
            )
        except _StillRunning:
            return None

    # -- commands -----------------------------------------------------------------------------
    def execute(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        """Run ``argv`` (the same semantics as the SSH channel; see the module docstring)."""
        if not argv:
            raise ValueError("execute needs a command")
        parts = as_user(argv, env, user, self.user)
        start = time.monotonic()
        limit = self.max_wait if timeout is None else timeout
        workdir = self._api(
            "make a temporary directory (CreateTemporaryDirectoryInGuest)",
            lambda g, vm: g.fileManager.CreateTemporaryDirectoryInGuest(
                vm, self._auth(), "vmenv.", "", None
            ),
        )
        workdir = str(workdir).rstrip("/")
        try:
            if input:
                self._put(f"{workdir}/i", input)
            pid = self._start(WRAPPER.argv(parts, workdir))
            code = self._wait(pid, start + limit)
            if code is None:
                self._kill(workdir, pid)
                raise errors.CommandTimeout(self.machine, list(argv), limit)
            out, err = Output(max_output), Output(max_output)
            self._get(f"{workdir}/o", out)
            self._get(f"{workdir}/e", err)
        finally:
            self._remove(workdir)
        return Result.from_output(code, out, err, time.monotonic() - start)

    def _kill(self, workdir: str, pid: int) -> None:
        """Kill the command's process group, then the wrapper if it still runs."""
        try:
            killer = self._start(WRAPPER.kill_argv(workdir, KILL))
            self._wait(killer, time.monotonic() + 10)
            if self._wait(pid, time.monotonic() + 5) is not None:
                return
        except errors.VmenvError as exc:
            log.warning("vsphere: %s: killing the timed-out command's group failed: %s",
                        self.machine, exc)  # fmt: skip
        try:
            self._api(
                "stop a program (TerminateProcessInGuest)",
                lambda g, vm: g.processManager.TerminateProcessInGuest(vm, self._auth(), pid),
            )
        except errors.VmenvError as exc:
            log.debug("vsphere: %s: TerminateProcessInGuest(%d): %s", self.machine, pid, exc)

    def _remove(self, workdir: str) -> None:
        try:
            self._api(
                "remove a temporary directory (DeleteDirectoryInGuest)",
                lambda g, vm: g.fileManager.DeleteDirectoryInGuest(vm, self._auth(), workdir, True),
            )
        except errors.VmenvError as exc:
            log.debug("vsphere: %s: leaving %s behind: %s", self.machine, workdir, exc)

    # -- files --------------------------------------------------------------------------------
    def copy_in(self, src: Path, dst: str) -> None:
        """Copy the local file ``src`` to ``dst`` in the guest (created or replaced)."""
        self._put(dst, Path(src).read_bytes())

    def copy_out(self, src: str, dst: Path, *, max_size: int | None = GET_LIMIT) -> None:
        """Copy ``src`` from the guest to the local file ``dst``, streamed.

        A file over ``max_size`` bytes is refused before its transfer (:class:`FileTooLarge`).
        Blocks of zeros are written as holes.
        """
        with local_copy(dst) as out:
            self._get(src, out.write, max_size)

    def _put(self, path: str, data: bytes) -> None:
        url = self._api(
            f"upload {path} (InitiateFileTransferToGuest)",
            lambda g, vm: g.fileManager.InitiateFileTransferToGuest(
                vm, self._auth(), path, vim.vm.guest.FileManager.FileAttributes(), len(data), True
            ),
        )
        self._http("PUT", str(url), data, f"upload {path}")

    def _get(
        self, path: str, sink: Output | Callable[[bytes], bool], max_size: int | None = None
    ) -> int:
        """Download ``path`` into ``sink`` (an :class:`Output` stops the transfer once full);
        the file's size. Over ``max_size`` it is refused before the transfer."""
        info = self._api(
            f"download {path} (InitiateFileTransferFromGuest)",
            lambda g, vm: g.fileManager.InitiateFileTransferFromGuest(vm, self._auth(), path),
        )
        size = int(info.size or 0)
        if max_size is not None and size > max_size:
            raise errors.FileTooLarge(self.machine, path, size, max_size)
        if isinstance(sink, Output):
            out = sink

            def keep(chunk: bytes) -> bool:
                out.write(chunk)
                return out.kept < out.limit

            got = self._http("GET", str(info.url), None, f"download {path}", keep)
            out.dropped = max(out.dropped, size - out.kept)
            if got < size and out.kept < out.limit:
                self._short(path, got, size)
            return size
        got = self._http("GET", str(info.url), None, f"download {path}", sink, max_size)
        if info.size and got != size:
            self._short(path, got, size)
        return got

    def _short(self, path: str, got: int, size: int) -> None:
        raise errors.BackendError(
            f"vsphere: {self.machine}: download {path}: got {got} of {size} bytes"
        )

    def _http(
        self,
        method: str,
        url: str,
        body: bytes | None,
        what: str,
        sink: Callable[[bytes], bool] | None = None,
        limit: int | None = None,
    ) -> int:
        """One request to a transfer URL, verified like the API connection.

        The response body goes to ``sink`` in chunks until it returns False (the rest is
        not read); more than ``limit`` bytes raise :class:`FileTooLarge`. Returns the bytes
        read.
        """
        parts = urlsplit(url)
        host = parts.hostname
        if not host or host == "*":
            host = self._conn.config.host
        where = f"https://{host}:{parts.port or 443}{parts.path}"  # no query: it holds a ticket
        if parts.scheme != "https":
            raise errors.BackendError(
                f"vsphere: {self.machine}: {what}: refusing a non-HTTPS transfer URL ({where})"
            )
        conn = http.client.HTTPSConnection(
            host, parts.port or 443, context=self._conn.ssl_context(), timeout=self.http_timeout
        )
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            headers = {"Content-Length": str(len(body))} if body is not None else {}
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            got, head = 0, b""
            while chunk := resp.read(1 << 16):
                if resp.status >= 300:
                    head = (head + chunk)[:200]
                    continue
                got += len(chunk)
                if limit is not None and got > limit:
                    raise errors.FileTooLarge(self.machine, what.split(" ", 1)[-1], got, limit)
                if sink is not None and not sink(chunk):
                    break
        except ssl.SSLError as exc:
            raise errors.BackendError(
                f"vsphere: {self.machine}: {what}: TLS to {where} failed: {exc.reason or exc} "
                "(the ESXi host's certificate must be trusted too: set ca_file to a bundle "
                "with its CA, or insecure = true)"
            ) from None
        except OSError as exc:
            raise errors.BackendError(
                f"vsphere: {self.machine}: {what}: {method} {where} failed: {exc}"
            ) from None
        finally:
            conn.close()
        if resp.status >= 300:
            raise errors.BackendError(
                f"vsphere: {self.machine}: {what}: {method} {where} answered {resp.status} "
                f"{resp.reason}: {head!r}"
            )
        return got

    def close(self) -> None:
        """Nothing to close: each call is a vCenter request or a one-shot HTTPS transfer."""
