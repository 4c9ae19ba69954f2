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

:class:`Boundary` is the one place where a backend's foreign exceptions become this tree: a
table of (exception types, rule) pairs per backend, applied by one decorator. What no rule
claims (a ``ValueError`` or ``KeyError`` of our own code, say) passes unchanged: our bugs stay
bugs and are never reported as the infrastructure's fault.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BootTimeout",
    "Boundary",
    "Call",
    "CommandFailed",
    "CommandTimeout",
    "ConfigError",
    "FileTooLarge",
    "MachineGone",
    "ProvisionError",
    "TemplateInUse",
    "VmenvError",
    "command_text",
    "failed",
    "gone",
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


def command_text(command: str | Sequence[str]) -> str:
    """A command as a user wrote it: a shell string as is, an argv quoted for a shell."""
    return command if isinstance(command, str) else shlex.join(command)


class CommandTimeout(VmenvError):
    """A command ran past its ``timeout=``; its process group was killed."""

    def __init__(self, machine: str, command: str | Sequence[str], timeout: float) -> None:
        super().__init__(
            f"command on {machine!r} timed out after {timeout:g}s (process group killed): "
            f"{command_text(command)}"
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
            f"{command_text(command)}\n"
            f"  stdout:\n{_tail(stdout)}\n"
            f"  stderr:\n{_tail(stderr)}"
        )
        self.machine = machine
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


_F = TypeVar("_F", bound=Callable[..., Any])


class _Machine(Protocol):
    """What a rule reads of the call's ``MachineRef`` (so that this module's types need
    nothing of ours; the decorator imports ``MachineRef`` only when a call fails)."""

    @property
    def name(self) -> str: ...

    @property
    def id(self) -> str: ...


@dataclass(frozen=True)
class Call:
    """The call a foreign exception escaped from: what a :data:`Rule` words its message with.

    ``what`` is the operation (a protocol method's name unless the boundary was given one);
    ``ref`` is the machine it was about, when one of its arguments was a ``MachineRef``.
    """

    backend: str
    what: str
    ref: _Machine | None = None

    @property
    def machine(self) -> str:
        """``machine 'web' (id)``, or ``the machine`` when the call named none."""
        return f"machine {self.ref.name!r} ({self.ref.id})" if self.ref else "the machine"


Rule = Callable[[BaseException, Call], VmenvError | None]
"""Turns a foreign exception into our error, or returns None to leave it to the next rule."""


def failed(kind: type[BackendError] = BackendError, hint: str = "") -> Rule:
    """The default rule: ``BACKEND: WHAT failed: EXC`` as ``kind``, then ``hint`` (what to do)."""

    def rule(exc: BaseException, call: Call) -> VmenvError:
        return kind(f"{call.backend}: {call.what} failed: {exc}{hint}")

    return rule


def gone(hint: str = "") -> Rule:
    """``MachineGone`` naming the machine of the call (``hint`` says what is left to do)."""

    def rule(exc: BaseException, call: Call) -> VmenvError:
        return MachineGone(f"{call.backend}: {call.machine} is gone: {exc}{hint}")

    return rule


class Boundary:
    """Maps a backend's foreign exceptions into this tree, by one table.

    ``rules`` are tried in order; the first whose exception types match and that returns an
    error wins. Our own errors pass through untouched, and so does anything no rule claims.
    ``hide_cause`` raises the mapped error ``from None`` (for libraries whose exceptions carry
    pages of their own state, like pyVmomi's faults); else it is chained ``from`` the original.

    Use it as a decorator on the protocol methods (``@boundary``; ``what`` is the method's
    name) or around a block (``with boundary.guard("login"): ...``).
    """

    def __init__(
        self,
        backend: str,
        rules: Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], Rule]],
        *,
        hide_cause: bool = False,
    ) -> None:
        self.backend = backend
        self.rules = tuple(rules)
        self.hide_cause = hide_cause

    def translate(self, exc: BaseException, call: Call) -> VmenvError | None:
        """The error ``exc`` becomes, or None when it is not the infrastructure's to map."""
        if isinstance(exc, VmenvError):
            return None
        for types, rule in self.rules:
            if isinstance(exc, types):
                mapped = rule(exc, call)
                if mapped is not None:
                    return mapped
        return None

    def _raise(self, exc: BaseException, what: str, ref: _Machine | None) -> None:
        mapped = self.translate(exc, Call(self.backend, what, ref))
        if mapped is None:
            return
        if self.hide_cause:
            raise mapped from None
        raise mapped from exc

    def __call__(self, func: _F) -> _F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                from .backend import MachineRef

                ref = next((a for a in args if isinstance(a, MachineRef)), None)
                self._raise(exc, func.__name__, ref)
                raise

        return wrapper  # type: ignore[return-value]

    @contextlib.contextmanager
    def guard(self, what: str, ref: _Machine | None = None) -> Iterator[None]:
        """Map what escapes the block as the decorator would, ``what`` naming the operation."""
        try:
            yield
        except Exception as exc:
            self._raise(exc, what, ref)
            raise
