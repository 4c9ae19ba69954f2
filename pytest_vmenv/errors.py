"""The exception tree of pytest-vmenv.

Every error the plugin raises is a :class:`VmenvError`; foreign exceptions
(``OSError``, ``libvirt.libvirtError``, ``vmodl.MethodFault``) are mapped into this tree at
the backend boundary, so a test author catches one family::

    VmenvError
    ├── ConfigError            bad marker, option or vmenv.toml: the user's to fix
    ├── BackendUnavailable     the backend cannot run on this host (with the reason)
    ├── BackendError           the infrastructure failed: not the test's fault
    │   ├── ProvisionError     a provision step exited non-zero or timed out
    │   ├── BootTimeout        a machine did not become ready in time (carries console tail)
    │   ├── MachineGone        the machine no longer exists (killed, destroyed, crashed)
    │   └── TemplateInUse      a template was not removed: a machine is still built on it
    ├── CommandTimeout         ``run(timeout=...)`` passed; the command's process group was killed
    ├── FileTooLarge           ``get``/``read_bytes`` refused a file over ``max_size``
    └── CommandFailed          ``succeed``/``fail`` saw the wrong exit status (also AssertionError)

Infrastructure faults are not ``AssertionError``: a report tells "the VM broke" apart from
"the check the test asked for failed" (the NixOS test driver's rule).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BootTimeout",
    "CommandFailed",
    "CommandTimeout",
    "ConfigError",
    "FileTooLarge",
    "MachineGone",
    "ProvisionError",
    "TemplateInUse",
    "VmenvError",
]


class VmenvError(Exception):
    """Base of every pytest-vmenv error."""


class ConfigError(VmenvError):
    """A marker, option or configuration value is invalid; the message says where and why."""


class BackendUnavailable(VmenvError):
    """The backend cannot run here; ``reason`` says why and what would fix it."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r} is unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class BackendError(VmenvError):
    """The hypervisor or the machine failed; not an assertion about the system under test."""


class ProvisionError(BackendError):
    """A provision step failed while building a template."""


class BootTimeout(BackendError):
    """A machine did not become ready in time; ``console_tail`` holds what it printed last."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        text = message
        if console_tail:
            text += "\n--- console (tail) ---\n" + console_tail
        super().__init__(text)
        self.console_tail = console_tail


class MachineGone(BackendError):
    """The machine does not exist any more (destroyed, crashed or reaped)."""


class TemplateInUse(BackendError):
    """``remove_template`` left the template: ``holder`` (a kept machine, say) is built on it.

    Not a failure of a sweep or a session end: the template's record stays, and the sweep
    that removes the last machine on it (``vmenv gc --all``) removes the template too.
    """

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def _tail(data: str, lines: int = 20) -> str:
    parts = data.rstrip("\n").splitlines()
    if len(parts) > lines:
        parts = [f"... ({len(parts) - lines} lines cut)", *parts[-lines:]]
    return "\n".join("    " + p for p in parts) if parts else "    (empty)"


def _show(command: str | Sequence[str]) -> str:
    if isinstance(command, str):
        return command
    import shlex

    return shlex.join(command)


class CommandTimeout(VmenvError):
    """A command ran past its ``timeout=``; its process group was killed."""

    def __init__(self, machine: str, command: str | Sequence[str], timeout: float) -> None:
        super().__init__(
            f"command on {machine!r} timed out after {timeout:g}s (process group killed): "
            f"{_show(command)}"
        )
        self.machine = machine
        self.command = command
        self.timeout = timeout


class FileTooLarge(VmenvError):
    """A file copied out of a machine is larger than the ``max_size`` the call allows.

    Nothing is left at the destination. ``size`` is the file's size in bytes when the guest
    told it (a file that grew during the copy reports the point where it was stopped).
    """

    def __init__(self, machine: str, path: str, size: int, max_size: int) -> None:
        super().__init__(
            f"get {path!r} from {machine!r}: the file is {_human(size)}, over "
            f"max_size={max_size} ({_human(max_size)}); nothing was copied. Pass a larger "
            "max_size= (or max_size=None for no limit), or copy a part of it (`head -c N`)"
        )
        self.machine = machine
        self.path = path
        self.size = size
        self.max_size = max_size


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"


class CommandFailed(VmenvError, AssertionError):
    """A command's exit status was not what ``succeed``/``fail`` required.

    It is an ``AssertionError``: the test asked for this check and it did not hold.
    """

    def __init__(
        self,
        machine: str,
        command: str | Sequence[str],
        exit_code: int,
        stdout: str,
        stderr: str,
        expected: str = "exit status 0",
    ) -> None:
        super().__init__(
            f"command on {machine!r} exited with {exit_code}, expected {expected}: "
            f"{_show(command)}\n"
            f"  stdout:\n{_tail(stdout)}\n"
            f"  stderr:\n{_tail(stderr)}"
        )
        self.machine = machine
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
