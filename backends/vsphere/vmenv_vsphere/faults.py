"""Where vSphere's exceptions become :mod:`pytest_vmenv.errors`: the one table, :data:`BOUNDARY`.

Every protocol method is decorated with it; logins, task waits and guest operations run
under ``BOUNDARY.guard(what, target)``. The target tells the three kinds of call apart:

* a machine (a :class:`~pytest_vmenv.backend.MachineRef`) or none: an object that is gone is
  :class:`MachineGone`, a refused login or a missing privilege :class:`BackendUnavailable`,
  any other fault or ``OSError`` :class:`BackendError`, each with the fault's own message;
* a :class:`Server` (a login, or ``check``): everything is :class:`BackendUnavailable` saying
  what to fix (the password, ``ca_file``, the URL), never with a secret in it;
* a :class:`Guest` (a VMware Tools guest operation): the fault says what would fix it
  (Tools, ``guest_user``/``guest_password``, the vSphere user's privileges, SSH instead).

pyVmomi's faults carry pages of their own state, so the mapped error hides its cause. What no
rule claims (a ``ValueError`` of our own code, say) passes unchanged.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from pytest_vmenv import errors

from .config import VsphereConfig

__all__ = ["BOUNDARY", "NAME", "Guest", "Server", "fault_message", "unreachable"]

NAME = "vsphere"


def fault_message(fault: BaseException | Any) -> str:
    """The human part of a vSphere fault (``msg``, else its type name)."""
    msg = getattr(fault, "msg", None) or getattr(fault, "localizedMessage", None)
    name = type(fault).__name__.rsplit(".", 1)[-1]
    return f"{name}: {msg}" if msg else name


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


@dataclass(frozen=True)
class Server:
    """The target of a login or a server check: the server and user of ``config``."""

    config: VsphereConfig

    @property
    def name(self) -> str:
        cfg = self.config
        return f"{cfg.user or '(no user)'}@{cfg.host}:{cfg.port}"

    @property
    def id(self) -> str:
        return self.config.url


@dataclass(frozen=True)
class Guest:
    """The target of a guest operation: the machine ``name``, its VM ``id``, the guest user."""

    name: str
    id: str
    user: str


def _where(call: errors.Call) -> str:
    return f"{call.ref.name}: {call.what}" if call.ref is not None else call.what


def _server(exc: BaseException, call: errors.Call) -> errors.VmenvError | None:
    if not isinstance(call.ref, Server):
        return None
    cfg = call.ref.config
    if isinstance(exc, vim.fault.InvalidLogin):
        why = f"login as {call.ref.name} failed: incorrect user name or password"
    elif isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or exc
        why = (
            f"TLS to {cfg.host}:{cfg.port} failed: {reason} (set ca_file to the server's CA "
            "bundle, or insecure = true to skip verification)"
        )
    elif isinstance(exc, OSError):
        why = unreachable(cfg, exc)
    else:
        why = f"cannot {call.what} as {call.ref.name}: {fault_message(exc)}"
    return errors.BackendUnavailable(NAME, why)


def _guest(hint: str) -> errors.Rule:
    """A rule for guest operations: ``hint`` with ``{fault}`` and ``{user}`` filled in."""

    def rule(exc: BaseException, call: errors.Call) -> errors.VmenvError | None:
        if not isinstance(call.ref, Guest):
            return None
        text = hint.format(fault=fault_message(exc), user=call.ref.user)
        return errors.BackendError(f"{NAME}: {_where(call)}: {text}")

    return rule


def _gone(exc: BaseException, call: errors.Call) -> errors.VmenvError:
    return errors.MachineGone(f"{NAME}: {_where(call)}: {fault_message(exc)}")


def _denied(exc: BaseException, call: errors.Call) -> errors.VmenvError:
    return errors.BackendUnavailable(NAME, f"{_where(call)}: {fault_message(exc)}")


def _fault(exc: BaseException, call: errors.Call) -> errors.VmenvError:
    return errors.BackendError(f"{NAME}: {_where(call)}: {fault_message(exc)}")


_UNSUPPORTED = (vmodl.fault.MethodNotFound, vmodl.fault.NotImplemented, vmodl.fault.NotSupported)
_REFUSED = (
    vim.fault.GuestComponentsOutOfDate,
    vim.fault.OperationDisabledByGuest,
    vim.fault.OperationNotSupportedByGuest,
    vim.fault.GuestAuthenticationChallenge,
)

BOUNDARY = errors.Boundary(
    NAME,
    [
        ((vmodl.MethodFault, OSError), _server),
        (_UNSUPPORTED, _guest(
            "guest operations are not supported by this server ({fault}); configure ssh_key "
            "or ssh_password to run commands over SSH instead"
        )),
        (vim.fault.InvalidGuestLogin, _guest(
            "the guest rejected the login as {user!r}: incorrect user name or password (check "
            "guest_user and guest_password in [tool.vmenv.backends.vsphere])"
        )),
        ((vim.fault.GuestOperationsUnavailable, vim.fault.InvalidPowerState), _guest(
            "VMware Tools in the guest is not running or not answering ({fault}); is "
            "open-vm-tools installed and started in the template?"
        )),
        (vim.fault.GuestPermissionDenied, _guest(
            "guest user {user!r} is not allowed to do this ({fault})"
        )),
        (_REFUSED, _guest(
            "the guest's VMware Tools refuses guest operations ({fault}): update or enable "
            "open-vm-tools, or configure SSH"
        )),
        (vim.fault.TooManyGuestLogons, _guest("too many guest logons; retry later")),
        (vim.fault.NoPermission, _guest(
            "the vSphere user lacks the privileges Virtual machine > Guest operations > Query, "
            "Modify and Program execution ({fault})"
        )),
        (vim.fault.FileNotFound, _guest("no such file in the guest ({fault})")),
        ((vmodl.fault.ManagedObjectNotFound, vim.fault.NotFound), _gone),
        ((vim.fault.InvalidLogin, vim.fault.NoPermission), _denied),
        (vmodl.MethodFault, _fault),
        (OSError, errors.failed()),
    ],
    hide_cause=True,
)  # fmt: skip
"""The vSphere backend's exception boundary (see the module docstring)."""
