"""``vm.testinfra()``: a pytest-testinfra ``Host`` whose commands go through the plugin's channel.

testinfra's modules (``host.package``, ``host.service``, ``host.socket``, ``host.file``,
``host.user``...) all come down to one call, ``backend.run(command, *args)``: ``command`` is a
shell command string with ``%s`` holes, ``args`` are quoted into them (``shlex.quote``), and
the result is a ``CommandResult`` of the exit status and the two output streams. The backend
here runs that string with :meth:`Machine.run <pytest_vmenv.machine.Machine.run>` (``/bin/sh
-c``), so it works on every backend of the plugin and needs no SSH, no Docker and nothing
else in the guest beyond what the module itself runs (``dpkg-query``, ``systemctl``, ``ss``,
``stat``, ``getent``...).

* The output is handed over as the bytes the command wrote; testinfra decodes them itself.
  Output past the plugin's cap (``max_output``) would make a module's answer wrong without a
  sign, so it raises :class:`TestinfraOutputTruncated` instead.
* ``host.sudo(user)`` needs no ``sudo`` in the guest: the user it asks for (root when none) is
  passed to ``Machine.run(user=...)``, which switches the way the backend's channel can
  (``runuser`` when the channel is root). Nested, the innermost user wins, as with sudo.

testinfra is imported on the first call only (the ``testinfra`` extra), so the plugin works
without it; a missing install is a :class:`~pytest_vmenv.errors.ConfigError` that says what to
install. testinfra ships no type information, so its classes are typed ``Any`` here.
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, VmenvError

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["INSTALL", "TestinfraOutputTruncated", "host_of"]

INSTALL = "pip install 'pytest-vmenv[testinfra]'"


class TestinfraOutputTruncated(VmenvError):
    """A command run for testinfra wrote more than the plugin keeps of one stream."""

    __test__ = False  # not a test class, whatever pytest's python_classes say


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            f"vm.testinfra() needs pytest-testinfra, which is not installed ({exc}): {INSTALL}"
        ) from None


@functools.cache
def _classes() -> tuple[Any, type[Any]]:
    """``(testinfra.host.Host, the backend class)``, made once testinfra is importable."""
    base: Any = _import("testinfra.backend.base").BaseBackend
    host = _import("testinfra.host")

    class VmenvBackend(base):  # type: ignore[misc]  # testinfra is untyped: base is Any
        """A testinfra backend over one :class:`Machine` (see the module docstring)."""

        NAME = "vmenv"

        def __init__(
            self, machine: Machine, user: str | None, timeout: float | None, max_output: int
        ) -> None:
            super().__init__(machine.name)
            self.machine = machine
            self.user = user
            self.timeout = timeout
            self.max_output = max_output
            self._switch = threading.local()  # per thread: two threads may share one host

        def get_sudo_command(self, command: str, sudo_user: str | None) -> str:
            """``host.sudo(user)``: note the user for :meth:`run` (the first noted is the
            innermost ``sudo``, which wins) and leave the command as it is."""
            if getattr(self._switch, "user", None) is None:
                self._switch.user = sudo_user or "root"
            return command

        def run(self, command: str, *args: str, **kwargs: Any) -> Any:
            self._switch.user = None
            try:
                cmd = self.get_command(command, *args)
                user = self._switch.user or self.user
            finally:
                self._switch.user = None
            result = self.machine.run(
                cmd, user=user, timeout=self.timeout, max_output=self.max_output
            )
            if result.truncated:
                raise TestinfraOutputTruncated(
                    f"{self.machine.name}: testinfra ran {cmd!r}, which wrote more than "
                    f"{self.max_output} bytes to one stream (stdout {result.stdout_dropped}, "
                    f"stderr {result.stderr_dropped} bytes past it): its answer would be wrong. "
                    "Pass a larger max_output= to vm.testinfra()"
                )
            return self.result(
                result.exit_code, self.encode(cmd), result.stdout_bytes, result.stderr_bytes
            )

    return host.Host, VmenvBackend


def host_of(machine: Machine, *, user: str | None, timeout: float | None, max_output: int) -> Any:
    """A ``testinfra.host.Host`` running every command on ``machine`` (as ``user``)."""
    host_class, backend_class = _classes()
    backend = backend_class(machine, user, timeout, max_output)
    host = host_class(backend)
    backend.set_host(host)
    return host
