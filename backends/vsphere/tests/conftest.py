"""Fixtures for the vSphere tests: a running vcsim, a base template in it, simulated guests.

vcsim is started by ``exports=$(bash .ci/vsphere.sh start) && eval "$exports"`` (built from
Debian's govmomi source, run as ``nobody`` on 127.0.0.1), which exports ``GOVC_URL``,
``VMENV_VCSIM_CA`` and ``VMENV_VCSIM_BIN``. When a collected test needs vcsim and
``GOVC_URL`` is unset or nothing answers there (a simulator that was stopped), the run stops
before any test with one line saying so and how to start it: these tests exist to run against
the real simulator, so they are never skipped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from guestlab import GuestLab, hostname_of
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl
from vmenv_vsphere import VsphereBackend
from vmenv_vsphere.vms import props

from pytest_vmenv.backend import MachineRef
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

VCSIM_BIN = Path(os.environ.get("VMENV_VCSIM_BIN", "/var/lib/vmenv-vcsim/vcsim"))
VCSIM_DIR = VCSIM_BIN.parent
BASE = "vmenv-base"
START = (
    'start it with `exports=$(bash .ci/vsphere.sh start) && eval "$exports"`'
    " from the repository root"
)


def vcsim_problem(env: Mapping[str, str]) -> str | None:
    """Why the vcsim named by ``env`` cannot be used (None when it answers on 127.0.0.1)."""
    url = env.get("GOVC_URL", "")
    if not url:
        return f"vcsim is not running (GOVC_URL is not set): {START}"
    parts = urlsplit(url)
    if parts.hostname != "127.0.0.1":
        return f"refusing to test against {parts.hostname}: GOVC_URL must name vcsim on 127.0.0.1"
    try:
        socket.create_connection(("127.0.0.1", parts.port or 443), timeout=5).close()
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc)
        return f"vcsim is not running at {url} ({why}; GOVC_URL is stale?): {START}"
    if not env.get("VMENV_VCSIM_CA"):
        return f"VMENV_VCSIM_CA is not set (vcsim's certificate): {START}"
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop the run once, before any test, when a selected test needs vcsim and it is dead."""
    if any("vcsim" in getattr(item, "fixturenames", ()) for item in session.items):
        problem = vcsim_problem(os.environ)
        if problem:
            raise pytest.UsageError(problem)


@pytest.fixture(scope="session")
def vcsim() -> dict[str, str]:
    """``GOVC_URL`` (no credentials in it) and ``VMENV_VCSIM_CA`` of the running vcsim."""
    problem = vcsim_problem(os.environ)
    if problem:  # checked at collection already; here for a test selected another way
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
    return {key: os.environ[key] for key in ("GOVC_URL", "VMENV_VCSIM_CA")}


@pytest.fixture(scope="session")
def vcsim_password() -> str:
    return "vcsim-secret-" + secrets.token_hex(6)


def admin(vcsim: dict[str, str]) -> Any:
    """A raw pyvmomi login to vcsim (vcsim accepts any user and password unless -username)."""
    u = urlsplit(vcsim["GOVC_URL"])
    ctx = ssl.create_default_context(cafile=vcsim["VMENV_VCSIM_CA"])
    return SmartConnect(host=u.hostname, port=u.port, user="admin", pwd="admin", sslContext=ctx)


@pytest.fixture(scope="session")
def base_template(vcsim: dict[str, str]) -> Iterator[str]:
    """A powered-off VM ``vmenv-base`` without snapshots (the backend makes ``clean``)."""
    si = admin(vcsim)
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    vms = {vm.name: vm for vm in view.view}
    if BASE not in vms:
        source = vms["DC0_C0_RP0_VM0"]
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=source.resourcePool))
        WaitForTask(source.CloneVM_Task(folder=source.parent, name=BASE, spec=spec))
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        vm = next(v for v in view.view if v.name == BASE)
        if vm.runtime.powerState == "poweredOn":
            WaitForTask(vm.PowerOffVM_Task())
    Disconnect(si)
    yield BASE


@pytest.fixture(scope="session")
def lab(vcsim: dict[str, str]) -> Iterator[GuestLab]:
    lab = GuestLab(state_dir() / "vsphere-lab" / secrets.token_hex(4), password="guest-pw")
    lab.start()
    si = admin(vcsim)

    def exists(moref: str) -> bool:
        try:
            return bool(vim.VirtualMachine(moref, si._stub).name)
        except vmodl.fault.ManagedObjectNotFound:
            return False

    lab.exists = exists
    yield lab
    lab.stop()
    Disconnect(si)
    shutil.rmtree(lab.root, ignore_errors=True)


class LabBackend(VsphereBackend):
    """The real backend, with guests found in the lab (vcsim gives them all 127.0.0.1)."""

    lab: GuestLab

    def guest_endpoint(self, ref: MachineRef) -> tuple[str, int]:
        host, _ = super().guest_endpoint(ref)  # the IP vcsim reports for the VM
        vm = self._vm(ref.id)
        extra = props(self.conn, vm, ["config.extraConfig"]).get("config.extraConfig") or ()
        labels = {o.key: str(o.value) for o in extra}
        parent = labels.get("guestinfo.vmenv.parent")
        return host, self.lab.port_for(ref.id, hostname_of(labels), parent)


def options(vcsim: dict[str, str], password: str, **more: Any) -> dict[str, Any]:
    return {
        "host": vcsim["GOVC_URL"], "user": "vmenv", "password": password,
        "ca_file": vcsim["VMENV_VCSIM_CA"], **more,
    }  # fmt: skip


@pytest.fixture(scope="session")
def lab_backend(
    vcsim: dict[str, str], vcsim_password: str, lab: GuestLab, base_template: str
) -> Iterator[LabBackend]:
    backend = LabBackend(options(vcsim, vcsim_password, ssh_key=str(lab.key_path)), environ={})
    backend.lab = lab
    backend.check()
    yield backend
    backend.close()


def base_spec(name: str = "conf", **image: Any) -> MachineSpec:
    image_config = {
        "template": BASE, "snapshot": "clean", "create_snapshot": True,
        "extra_config": {"SET.guest.ipAddress": "127.0.0.1"}, **image,
    }  # fmt: skip
    return MachineSpec(
        name=name, image="vcsim", backend="vsphere", image_config=image_config, timeout=60
    )
