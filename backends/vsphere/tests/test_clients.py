"""``vm.testinfra()`` and ``vm.ssh_config()`` on the vSphere backend (vcsim and the lab's SSH
server): testinfra's commands travel the backend's own SSH channel; ssh_config refuses, since
vSphere has no ``vm.forward`` yet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import LabBackend, base_spec

from pytest_vmenv.backend import Session
from pytest_vmenv.errors import BackendError
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir


@pytest.fixture
def vm(lab_backend: LabBackend) -> Iterator[Machine]:
    session = Session(id=f"cl-{os.urandom(4).hex()}", state_dir=state_dir(), worker_id="vs")
    template: Any = lab_backend.build_template(base_spec(), "vs-clients", session)
    spec = base_spec("infra")
    ref = lab_backend.clone(template, spec, session)
    try:
        yield Machine(lab_backend, ref, spec)
    finally:
        lab_backend.destroy(ref)
        lab_backend.remove_template(template)


def test_testinfra_runs_through_the_backends_ssh_channel(vm: Machine) -> None:
    pytest.importorskip("testinfra", reason="the testinfra extra is not installed")
    host = vm.testinfra(timeout=60)
    vm.write_text("/var/tmp/conf", "key = 1\n")
    vm.succeed("chmod 640 /var/tmp/conf")
    conf = host.file("/var/tmp/conf")
    assert (conf.content_string, conf.mode, conf.user) == ("key = 1\n", 0o640, "root")
    assert not host.file("/var/tmp/absent").exists
    tricky = "a b;'c\" $(touch /var/tmp/pwned)"
    out = host.run("printf %%s %s", tricky)
    assert (out.rc, out.stdout) == (0, tricky) and not host.file("/var/tmp/pwned").exists
    assert host.run("echo oops >&2; exit 3").stderr == "oops\n"
    assert host.check_output("hostname") == vm.succeed("hostname").strip()
    assert host.user("root").uid == 0


def test_ssh_config_says_vsphere_cannot_forward_yet(vm: Machine) -> None:
    with pytest.raises(BackendError, match=r"forward\(22\), which the 'vsphere' backend"):
        vm.ssh_config()
