"""The vSphere backend's one exception boundary (:data:`vmenv_vsphere.faults.BOUNDARY`)."""

from __future__ import annotations

import ssl

import pytest
from pyVmomi import vim, vmodl
from vmenv_vsphere import VsphereConfig
from vmenv_vsphere.faults import BOUNDARY, Guest, Server

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef

REF = MachineRef("vsphere", "vm-42", "web", "s1")


class _Probe:
    @BOUNDARY
    def destroy(self, ref: MachineRef, exc: BaseException) -> None:
        raise exc


@pytest.mark.parametrize(
    ("fault", "kind", "text"),
    [
        (vmodl.fault.ManagedObjectNotFound(msg="vm-42 is gone"), errors.MachineGone,
         "vsphere: web: destroy: ManagedObjectNotFound: vm-42 is gone"),
        (vim.fault.NotFound(), errors.MachineGone, "web: destroy: NotFound"),
        (vim.fault.NoPermission(msg="no"), errors.BackendUnavailable, "destroy: NoPermission: no"),
        (vim.fault.InvalidPowerState(msg="off"), errors.BackendError,
         "vsphere: web: destroy: InvalidPowerState: off"),
        (ConnectionResetError("reset"), errors.BackendError, "vsphere: destroy failed: reset"),
    ],
)  # fmt: skip
def test_protocol_methods_map_faults_and_os_errors(
    fault: BaseException, kind: type[errors.VmenvError], text: str
) -> None:
    with pytest.raises(kind) as info:
        _Probe().destroy(REF, fault)
    assert text in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("bug", [ValueError("ours"), KeyError("ours"), TypeError("ours")])
def test_our_own_bugs_pass_unchanged(bug: Exception) -> None:
    with pytest.raises(type(bug)):
        _Probe().destroy(REF, bug)


def test_login_faults_say_what_to_fix() -> None:
    server = Server(VsphereConfig.load({"host": "vc.example:8443", "user": "alice"}, {}))
    cases: list[tuple[BaseException, str]] = [
        (vim.fault.InvalidLogin(), "login as alice@vc.example:8443 failed: incorrect user name"),
        (ssl.SSLError(1, "bad cert"), "TLS to vc.example:8443 failed"),
        (ConnectionRefusedError(), "cannot reach vSphere at https://vc.example:8443/sdk"),
        (vim.fault.HostConnectFault(msg="x"), "cannot log in as alice@vc.example:8443"),
    ]
    for exc, text in cases:
        with pytest.raises(errors.BackendUnavailable, match=text), BOUNDARY.guard("log in", server):
            raise exc


def test_guest_operation_faults_carry_their_hint() -> None:
    guest = Guest("g1", "vm-7", "root")
    cases: list[tuple[Guest | None, BaseException, type[errors.VmenvError], str]] = [
        (guest, vim.fault.InvalidGuestLogin(), errors.BackendError, "rejected the login as 'root'"),
        (guest, vim.fault.NoPermission(), errors.BackendError, "Guest operations > Query"),
        (None, vim.fault.NoPermission(), errors.BackendUnavailable, "NoPermission"),  # no guest op
    ]
    for target, exc, kind, text in cases:
        with pytest.raises(kind, match=text), BOUNDARY.guard("start a program", target):
            raise exc
