"""SSH command channel: ``execute``/``copy_in``/``copy_out`` with the Backend's semantics.

The optional extra ``pytest-vmenv[ssh]``. Backends whose guests are reachable over the network
(vSphere guests by their VMware Tools IP, libvirt guests without an agent) use
:class:`SSHChannel` instead of writing their own. It is built on **asyncssh**, chosen over
paramiko because it is actively maintained with frequent releases, speaks current key
types and ciphers out of the box, multiplexes many concurrent sessions over one connection
without a thread per channel (parallel tests on one machine share a connection), reports
exit signals as well as exit statuses, and ships a server side that the tests use to prove
the channel against a real SSH peer.

Semantics, the same as every backend's ``execute``:

* exit codes are the command's; death by signal N is ``128 + N`` (as a shell reports it);
  a program that does not exist is 127;
* stdout and stderr are bytes, exactly as written, and stay separate; ``input`` is fed to
  stdin and then closed (no input: stdin is at EOF at once);
* ``env`` is set for the command (through ``env``, because sshd refuses most variables);
* ``timeout``: the command runs in its own session and process group (``setsid``); when the
  time passes, that group is killed with SIGKILL and :class:`CommandTimeout` is raised;
* a background process left running (``sleep 60 &``) does not hold ``execute`` open;
* at most ``max_output`` bytes of each stream are kept in memory (the rest is read and
  counted in ``Result.stdout_dropped``/``stderr_dropped``), and ``timeout`` bounds the whole
  call, the transfer of the output included.

How: the remote side runs the command under the channel wrapper (:mod:`.wrapper`) with a
run directory made by ``mktemp -d`` (its path is the first line back, so a timeout can kill
the group through its pid file), stdin from the channel, and both output files sent back once
the command ends. Output is therefore delivered when the command ends rather than streamed,
and needs room in the guest's ``$TMPDIR``; in exchange the background case and group kill work
the same against any sshd and any POSIX guest. Files travel over the same wrapper (``cat``),
so no SFTP subsystem is needed. ``copy_out`` streams ``cat`` straight into the local file
(runs of zero blocks become holes) and stops at ``max_size``.

Host keys: guests are fresh clones whose keys nobody knows in advance, so by default they are
not checked (as ``StrictHostKeyChecking=no``); pass ``known_hosts`` to check them. The
password is never part of a repr, a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from ..backend import GET_LIMIT, OUTPUT_LIMIT, Output, Result
from ..errors import BackendError, CommandTimeout, FileTooLarge
from ..poll import poll_until
from .files import local_copy
from .wrapper import Delivery, RunDir, Stdin, Wrapper, as_user

__all__ = ["SSHChannel", "SSHUnreachable"]

_T = TypeVar("_T")
_WRAPPER = Wrapper(RunDir.MKTEMP, Stdin.CHANNEL, Delivery.STREAM)


class SSHUnreachable(BackendError):
    """No SSH connection could be made (refused, timed out, or authentication failed)."""


class _Loop:
    """One asyncio loop in a daemon thread per process; the sync API submits coroutines."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="vmenv-ssh", daemon=True).start()
                cls._loop = loop
            loop = cls._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


class SSHChannel:
    """Commands and files over SSH to one machine (thread-safe; one connection, reused).

    ``key`` is a private key file; ``password`` is used when no key is given or the key is
    refused. ``machine`` names the machine in :class:`CommandTimeout` messages.
    """

    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str = "root",
        *,
        key: str | Path | None = None,
        password: str | None = None,
        known_hosts: str | Path | None = None,
        connect_timeout: float = 15.0,
        machine: str = "",
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self._key = str(key) if key else None
        self._password = password
        self._known_hosts = str(known_hosts) if known_hosts else None
        self.connect_timeout = connect_timeout
        self.machine = machine or host
        self._conn: asyncssh.SSHClientConnection | None = None
        self._conn_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        auth = "key" if self._key else "password" if self._password else "none"
        return f"<SSHChannel {self.user}@{self.host}:{self.port} auth={auth}>"

    # -- connection ---------------------------------------------------------------------------
    async def _connection(self) -> asyncssh.SSHClientConnection:
        if self._conn_lock is None:
            self._conn_lock = asyncio.Lock()
        async with self._conn_lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            try:
                self._conn = await asyncio.wait_for(
                    asyncssh.connect(
                        self.host,
                        self.port,
                        username=self.user,
                        password=self._password,
                        client_keys=[self._key] if self._key else None,
                        known_hosts=self._known_hosts,
                        agent_path=None,
                        keepalive_interval=30,
                        connect_timeout=self.connect_timeout,
                    ),
                    self.connect_timeout + 5,
                )
            except asyncssh.PermissionDenied:
                raise SSHUnreachable(
                    f"ssh {self.user}@{self.host}:{self.port}: authentication failed "
                    "(check the configured key or password)"
                ) from None
            except (TimeoutError, OSError, asyncssh.Error) as exc:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                raise SSHUnreachable(
                    f"ssh {self.user}@{self.host}:{self.port}: cannot connect: {reason}"
                ) from None
            return self._conn

    def wait_ready(self, timeout: float) -> None:
        """Connect, retrying until ``timeout`` seconds pass (a booting guest's sshd); then
        the last attempt's :class:`SSHUnreachable` propagates."""

        def connect(last_try: bool) -> bool | None:
            try:
                _Loop.run(self._connection())
            except SSHUnreachable:
                if last_try:
                    raise
                return None
            return True

        poll_until(connect, timeout=timeout, what=f"ssh to {self.host}", max_interval=2.0)

    def close(self) -> None:
        """Close the connection (reopened on the next use)."""
        conn, self._conn = self._conn, None
        if conn is not None:

            async def _close() -> None:
                conn.close()
                await conn.wait_closed()

            with contextlib.suppress(Exception):
                _Loop.run(_close(), 10)

    # -- commands -----------------------------------------------------------------------------
    def command_line(
        self, argv: Sequence[str], env: Mapping[str, str] | None, user: str | None
    ) -> str:
        """The remote command line for ``argv`` (the wrapper, env and user switch)."""
        return shlex.join(_WRAPPER.argv(as_user(argv, env, user, self.user)))

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
        """Run ``argv`` (see the module docstring for the exact semantics)."""
        if not argv:
            raise ValueError("execute needs a command")
        command = self.command_line(argv, env, user)
        start = time.monotonic()
        code, out, err = _Loop.run(self._run(command, input, timeout, list(argv), max_output))
        return Result.from_output(code, out, err, time.monotonic() - start)

    async def _run(
        self,
        command: str,
        input: bytes | None,
        timeout: float | None,
        argv: list[str],
        max_output: int = OUTPUT_LIMIT,
    ) -> tuple[int, Output, Output]:
        conn = await self._connection()
        try:
            proc = await conn.create_process(command, encoding=None)
        except (OSError, asyncssh.Error) as exc:
            self._conn = None
            raise SSHUnreachable(f"ssh {self.host}:{self.port}: {exc}") from None
        if input:
            proc.stdin.write(input)
        proc.stdin.write_eof()
        workdir: list[bytes] = []

        async def collect() -> tuple[Output, Output]:
            workdir.append((await proc.stdout.readline()).rstrip(b"\n"))
            out, err = Output(max_output), Output(max_output)
            await asyncio.gather(_read_into(proc.stdout, out), _read_into(proc.stderr, err))
            await proc.wait_closed()
            return out, err

        task = asyncio.ensure_future(collect())
        try:
            out, err = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            if workdir and workdir[0]:
                await self._kill_group(conn, workdir[0].decode())
            try:
                await asyncio.wait_for(task, 10)
            except (TimeoutError, asyncssh.Error, OSError):
                proc.close()
            assert timeout is not None
            raise CommandTimeout(self.machine, argv, timeout) from None
        except (asyncssh.Error, OSError, asyncio.IncompleteReadError) as exc:
            self._conn = None
            raise SSHUnreachable(f"ssh {self.host}:{self.port}: connection lost: {exc}") from None
        if proc.exit_status is not None and proc.exit_status >= 0:
            code = proc.exit_status
        elif proc.exit_signal:
            code = 128 + _signal_number(proc.exit_signal[0])
        else:
            self._conn = None
            raise SSHUnreachable(f"ssh {self.host}:{self.port}: the connection dropped")
        if code == 125 and not (workdir and workdir[0]):
            raise BackendError(
                f"ssh {self.host}:{self.port}: mktemp failed in the guest: {err.value()!r}"
            )
        return code, out, err

    async def _kill_group(self, conn: asyncssh.SSHClientConnection, workdir: str) -> None:
        command = shlex.join(_WRAPPER.kill_argv(workdir))
        with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
            await asyncio.wait_for(conn.run(command, check=False), 10)

    # -- files --------------------------------------------------------------------------------
    def copy_in(self, src: Path, dst: str) -> None:
        """Copy the local file ``src`` to ``dst`` in the machine (created or replaced)."""
        result = self.execute(["/bin/sh", "-c", 'cat >"$1"', "sh", dst], input=src.read_bytes())
        if not result.ok:
            raise BackendError(f"copy to {self.machine}:{dst} failed: {result.stderr.strip()}")

    def copy_out(self, src: str, dst: Path, *, max_size: int | None = GET_LIMIT) -> None:
        """Copy ``src`` from the machine to the local file ``dst``, streamed.

        Over ``max_size`` bytes the copy stops, ``dst`` is removed and :class:`FileTooLarge`
        raised. Blocks of zeros are written as holes.
        """
        dst = Path(dst)
        try:
            code, err = _Loop.run(self._copy_out(src, dst, max_size))
        except BaseException:
            dst.unlink(missing_ok=True)
            raise
        if code != 0:
            dst.unlink(missing_ok=True)
            raise BackendError(
                f"copy from {self.machine}:{src} failed: "
                f"{err.decode('utf-8', 'replace').strip() or f'exit status {code}'}"
            )

    async def _copy_out(self, src: str, dst: Path, max_size: int | None) -> tuple[int, bytes]:
        """Stream ``src`` into ``dst``; blocks of zeros become holes.

        With ``max_size``, the guest sends at most ``max_size + 1`` bytes (``head -c``), so
        a file over the cap ends the stream by itself and the channel closes cleanly: the
        connection stays usable for the next command (closing a channel mid-transfer left
        it dead). FileTooLarge is raised once the stream is over.
        """
        conn = await self._connection()
        quoted = shlex.quote(src)
        command = f"cat -- {quoted}" if max_size is None else f"head -c {max_size + 1} -- {quoted}"
        try:
            proc = await conn.create_process(command, encoding=None)
        except (OSError, asyncssh.Error) as exc:
            self._conn = None
            raise SSHUnreachable(f"ssh {self.host}:{self.port}: {exc}") from None
        proc.stdin.write_eof()
        err = Output(1 << 16)
        drain = asyncio.ensure_future(_read_into(proc.stderr, err))
        size = 0
        try:
            with local_copy(dst) as out:
                while chunk := await proc.stdout.read(1 << 16):
                    size += len(chunk)
                    if max_size is None or size <= max_size:
                        out.write(chunk)  # past it, at most one byte: let the stream end
            await drain
            await proc.wait_closed()
        except (asyncssh.Error, ConnectionError, asyncio.IncompleteReadError) as exc:
            self._conn = None
            raise SSHUnreachable(f"ssh {self.host}:{self.port}: connection lost: {exc}") from None
        finally:
            if not drain.done():
                proc.close()
                drain.cancel()
        code = proc.exit_status
        if code is None or code < 0:
            code = 128 + _signal_number(proc.exit_signal[0]) if proc.exit_signal else 255
        if code == 0 and max_size is not None and size > max_size:
            raise FileTooLarge(self.machine, src, size, max_size)
        return code, err.value()


async def _read_into(stream: asyncssh.SSHReader[bytes], sink: Output) -> None:
    """Read ``stream`` to its end into ``sink`` (which keeps what its limit allows)."""
    while chunk := await stream.read(1 << 16):
        sink.write(chunk)


def _signal_number(name: str) -> int:
    import signal

    try:
        return int(signal.Signals["SIG" + name.removeprefix("SIG")])
    except KeyError:
        return 0
