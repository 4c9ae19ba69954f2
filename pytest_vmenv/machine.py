"""Machine: the verbs a test author uses, written once over the backend's ``execute``."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack

from .backend import Backend, Forwarder, HostExposer, MachineRef, Snapshot
from .errors import (
    BackendError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    VmenvError,
    command_text,
)
from .paths import state_dir
from .poll import poll_until
from .results import GET_LIMIT, OUTPUT_LIMIT, Result
from .tracebacks import hide, trimmed

if TYPE_CHECKING:
    from .spec import MachineSpec
    from .sshconfig import SSHConfig

__all__ = ["CommandRecord", "Machine"]

log = logging.getLogger("pytest_vmenv")
Command = str | Sequence[str]
_T = TypeVar("_T")
# A failed verb is reported at the test's line, not in this module (see .tracebacks).
__tracebackhide__ = hide


def _backend(call: Callable[[], _T]) -> _T:
    """``call()``; a VmenvError from the backend comes out without the backend's frames."""
    try:
        return call()
    except VmenvError as exc:
        raise trimmed(exc)  # noqa: B904 - trimmed() decides what chain to show


class RunKeywords(TypedDict, total=False):
    """The keyword arguments of :meth:`Machine.run`, which ``succeed`` and ``fail`` pass on."""

    input: bytes | str | None
    env: Mapping[str, str] | None
    timeout: float | None
    user: str | None
    max_output: int


@dataclass(frozen=True)
class CommandRecord:
    """One command a test ran, for the failure report."""

    command: str
    exit_code: int | None  # None: timed out
    duration: float


def _check_call(machine: str, command: Command, env: Mapping[str, str] | None) -> None:
    if not command or (not isinstance(command, str) and not command[0]):
        raise ValueError(f"{machine}: run needs a command, got {command!r}")
    bad = [k for k in env or () if not k or "=" in k or "\0" in k]
    if bad:
        raise ValueError(f"{machine}: env: {bad[0]!r} is not a valid variable name")


def _argv(command: Command) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return [str(a) for a in command]


class Machine:
    """A running machine handed to a test.

    Commands given as a string run through ``/bin/sh -c``; a list runs as argv. ``run`` never
    raises on a non-zero exit; ``succeed``/``fail`` raise :class:`CommandFailed` (an
    ``AssertionError``) showing the command, exit code and output tails.
    """

    def __init__(
        self, backend: Backend, ref: MachineRef, spec: MachineSpec, scratch: Path | None = None
    ) -> None:
        self.backend = backend
        self.ref = ref
        self.spec = spec
        self.history: list[CommandRecord] = []
        self.intent: Path | None = None  # its ledger record, while the orchestrator owns it
        self._scratch = scratch or state_dir() / "scratch"
        self._forwards: dict[tuple[int, str], tuple[str, int]] = {}
        self._exposed: dict[int, tuple[str, int]] = {}
        self._scratch.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<Machine {self.name!r} backend={self.backend.name} id={self.ref.id}>"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ip(self) -> str | None:
        """The machine's address on its network, ``None`` when it has none."""
        return self.ref.ip

    def run(
        self,
        command: Command,
        *,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        user: str | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        """Run ``command``; raise :class:`CommandTimeout` if ``timeout`` seconds pass.

        ``timeout`` bounds the whole call, reading the output included. At most
        ``max_output`` bytes of each stream are kept (default 16 MiB): past that,
        ``Result.truncated`` is True and ``stdout_dropped``/``stderr_dropped`` count the rest.
        An empty command or an ``env`` name that cannot be one (empty, with ``=`` or NUL) is
        a ``ValueError`` here, the same on every backend.
        """
        _check_call(self.name, command, env)
        data = input.encode() if isinstance(input, str) else input
        shown = command_text(command)
        start = time.monotonic()
        try:
            result = self.backend.execute(
                self.ref, _argv(command), input=data, env=env, user=user, timeout=timeout,
                max_output=max_output,
            )  # fmt: skip
        except CommandTimeout as exc:
            self.history.append(CommandRecord(shown, None, time.monotonic() - start))
            raise trimmed(exc)  # noqa: B904 - trimmed() decides what chain to show
        except VmenvError as exc:
            raise trimmed(exc)  # noqa: B904
        self.history.append(CommandRecord(shown, result.exit_code, result.duration))
        if result.truncated:
            log.warning(
                "%s: %s wrote more than max_output=%d bytes per stream; kept the first "
                "(dropped: stdout %d, stderr %d bytes). Redirect it to a file and get() it, "
                "or pass a larger max_output=",
                self.name, shown, max_output, result.stdout_dropped,
                result.stderr_dropped,
            )  # fmt: skip
        return result

    def succeed(self, command: Command, **keywords: Unpack[RunKeywords]) -> str:
        """Run ``command`` (keywords as for :meth:`run`), require exit status 0, return its
        stdout."""
        result = self.run(command, **keywords)
        if result.exit_code != 0:
            raise CommandFailed(self.name, command, result.exit_code, result.stdout, result.stderr)
        return result.stdout

    def fail(self, command: Command, **keywords: Unpack[RunKeywords]) -> str:
        """Run ``command`` (keywords as for :meth:`run`), require a non-zero exit status,
        return its stdout."""
        result = self.run(command, **keywords)
        if result.exit_code == 0:
            raise CommandFailed(
                self.name, command, 0, result.stdout, result.stderr, expected="a non-zero status"
            )
        return result.stdout

    def wait_until_succeeds(
        self, command: Command, timeout: float = 30, interval: float = 0.1
    ) -> str:
        """Retry ``command`` until it exits 0; on the last try raise with its output."""
        deadline = time.monotonic() + timeout

        def probe(last_try: bool) -> str | None:
            result = self.run(command, timeout=max(deadline - time.monotonic(), 1.0))
            if result.exit_code == 0:
                return result.stdout
            if last_try or time.monotonic() + interval >= deadline:
                raise CommandFailed(
                    self.name, command, result.exit_code, result.stdout, result.stderr,
                    expected=f"exit status 0 within {timeout:g}s",
                )  # fmt: skip
            return None

        return poll_until(probe, timeout=timeout, what=command_text(command), interval=interval)

    def wait_until_fails(self, command: Command, timeout: float = 30) -> str:
        """Retry ``command`` until it exits non-zero."""
        deadline = time.monotonic() + timeout

        def probe(last_try: bool) -> str | None:
            result = self.run(command, timeout=max(deadline - time.monotonic(), 1.0))
            if result.exit_code != 0:
                return result.stdout
            if last_try or time.monotonic() >= deadline:
                raise CommandFailed(
                    self.name, command, 0, result.stdout, result.stderr,
                    expected=f"a non-zero status within {timeout:g}s",
                )  # fmt: skip
            return None

        return poll_until(
            probe, timeout=timeout, what=command_text(command), interval=0.2, max_interval=0.2
        )

    def listening_ports(self) -> set[int]:
        """TCP ports in LISTEN state inside the machine (read from /proc/net/tcp{,6})."""
        ports: set[int] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                text = self.read_text(table)
            except Exception:  # noqa: BLE001 - a kernel without IPv6 has no tcp6
                continue
            for line in text.splitlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    def wait_for_port(self, port: int, timeout: float = 30) -> None:
        """Wait until something in the machine listens on TCP ``port``.

        Reads the kernel's socket tables through the backend's file channel, so it needs no
        tool (``nc``, ``ss``) inside the image.
        """

        def probe(last_try: bool) -> bool | None:
            if port in self.listening_ports():
                return True
            if last_try:
                raise CommandFailed(
                    self.name, f"wait_for_port({port})", 1, "", "",
                    expected=f"a listener on TCP port {port} within {timeout:g}s",
                )  # fmt: skip
            return None

        poll_until(probe, timeout=timeout, what=f"TCP port {port}", interval=0.02, max_interval=0.5)

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy the local file ``local`` to ``remote`` inside the machine."""
        _backend(lambda: self.backend.copy_in(self.ref, Path(local), remote))

    def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        max_size: int | None = GET_LIMIT,
    ) -> None:
        """Copy the file ``remote`` from the machine to the local path ``local``.

        A file larger than ``max_size`` bytes (default 1 GiB; None: no limit) raises
        :class:`~pytest_vmenv.errors.FileTooLarge`. The copy goes to a temporary file beside
        ``local`` that replaces it only once complete: a failed ``get`` leaves an existing
        ``local`` as it was and no new one behind. Holes in a sparse file stay holes (the
        emulator sees them; other backends turn blocks of zeros into holes).
        """
        target = Path(local)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        partial = Path(name)
        try:
            _backend(lambda: self.backend.copy_out(self.ref, remote, partial, max_size=max_size))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def write_bytes(self, remote: str, data: bytes) -> None:
        """Write ``data`` to the file ``remote``, mode 0644 (what a shell makes under umask
        022, so a web server or another user can read it); :meth:`put` keeps a local file's
        own mode."""
        with tempfile.NamedTemporaryFile(dir=self._scratch, prefix="put-") as tmp:
            os.fchmod(tmp.fileno(), 0o644)
            tmp.write(data)
            tmp.flush()
            self.put(tmp.name, remote)

    def read_bytes(self, remote: str, *, max_size: int | None = GET_LIMIT) -> bytes:
        """The content of the file ``remote`` (``max_size`` as for :meth:`get`)."""
        with tempfile.TemporaryDirectory(dir=self._scratch, prefix="get-") as tmp:
            target = Path(tmp) / "data"
            self.get(remote, target, max_size=max_size)
            return target.read_bytes()

    def write_text(self, remote: str, text: str) -> None:
        """Write ``text`` (UTF-8) to ``remote``, mode 0644, as :meth:`write_bytes`."""
        self.write_bytes(remote, text.encode())

    def read_text(self, remote: str, *, max_size: int | None = GET_LIMIT) -> str:
        return self.read_bytes(remote, max_size=max_size).decode("utf-8", "replace")

    def snapshot(self, name: str = "snapshot") -> Snapshot:
        """Freeze the machine's current state; ``revert`` returns to it."""
        return _backend(lambda: self.backend.snapshot(self.ref, name))

    def revert(self, snapshot: Snapshot) -> None:
        self._exposed.clear()  # a revert, even a failed one, may move an exposed port
        _backend(lambda: self.backend.revert(self.ref, snapshot))

    def console_log(self) -> str:
        return _backend(lambda: self.backend.console_log(self.ref))

    def forward(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """``(address, port)`` on the host's loopback that reaches TCP ``port`` of the machine
        (as its own loopback sees it), for as long as the machine lives.

        Only this host's processes can connect: the listener binds ``host``, the loopback
        unless you ask for another address. Asking again for the same port gives the same
        address. See the backend's ``forward`` for where the relay lives.
        """
        _check_port(self.name, "forward", port)
        key = (port, host)
        known = self._forwards.get(key)
        if known is not None:
            return known
        backend = self.backend
        if not isinstance(backend, Forwarder):
            raise trimmed(
                BackendError(
                    f"{self.name}: the {backend.name!r} backend cannot forward ports yet "
                    "(vm.forward/vm.url work on the emulator and libvirt; vSphere gets them in "
                    "a later release): run this test on backend='emulator'"
                )
            )
        address = _backend(lambda: backend.forward(self.ref, port, host))
        self._forwards[key] = address
        return address

    def expose_host_port(self, port: int) -> tuple[str, int]:
        """``(address, port)`` that code *inside* the machine connects to to reach TCP
        ``port`` on the host's ``127.0.0.1`` (a mock server, a webhook receiver the test runs)
        while the machine lives: the mirror of :meth:`forward`. Nothing else of the host is
        reachable through it, only the machine's processes reach it (on the emulator: the
        guest's own ``127.0.0.1``, ``port`` itself when free there); the same port again
        gives the same address. See the backend's ``expose_host_port``."""
        _check_port(self.name, "expose_host_port", port)
        known = self._exposed.get(port)
        if known is not None:
            return known
        backend = self.backend
        if not isinstance(backend, HostExposer):
            raise trimmed(
                BackendError(
                    f"{self.name}: the {backend.name!r} backend cannot expose host ports yet "
                    "(vm.expose_host_port works on the emulator; libvirt and vSphere get it "
                    "in a later release): run this test on backend='emulator'"
                )
            )
        address = _backend(lambda: backend.expose_host_port(self.ref, port))
        self._exposed[port] = address
        return address

    def url(self, port: int = 80, path: str = "/", scheme: str = "http") -> str:
        """``scheme://HOST:PORT/path`` for TCP ``port`` of the machine (see :meth:`forward`)."""
        host, hostport = self.forward(port)
        if ":" in host:
            host = f"[{host}]"
        if not path.startswith("/"):
            path = "/" + path
        return f"{scheme}://{host}:{hostport}{path}"

    def testinfra(
        self, *, user: str | None = None, timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Any:  # fmt: skip
        """A pytest-testinfra ``Host`` (the ``testinfra`` extra) whose commands run through
        :meth:`run`, as ``user`` (default: the channel's own, root on the emulator and
        libvirt), each bounded by ``timeout``.

        ``host.package``, ``host.service``, ``host.socket``, ``host.file``, ``host.user`` and
        the rest work on every backend, with no SSH: see :mod:`pytest_vmenv.testinfra`.
        """
        from .testinfra import host_of

        return host_of(self, user=user, timeout=timeout, max_output=max_output)

    def ssh_config(self, user: str = "root") -> SSHConfig:
        """How a real SSH client (``ssh``, ``scp``, ansible) logs in to the machine as
        ``user``: host, port (``vm.forward(22)``), user, key file and the pinned host keys,
        with ``ssh_argv()``/``scp_argv()``. Authorizes the session's key and starts sshd when
        it is not running; an error says so on a backend that does not forward ports or an
        image without sshd. See :mod:`pytest_vmenv.sshsetup`.
        """
        from .sshsetup import ssh_config

        return ssh_config(self, user, self._scratch)


def _check_port(name: str, what: str, port: object) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"{name}: {what}(port): a TCP port 1..65535, got {port!r}")
