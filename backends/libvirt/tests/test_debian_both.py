"""One declaration, two backends: the same ``debian-12 + nginx`` tests on the emulator and on
libvirt (QEMU), parametrised over both.

Each backend builds its own image of the recipe (the emulator's tree, the libvirt
backend's qcow2 of the tree plus its guest packages) and one template of it, shared by the
tests of this module (libvirt's is the session's ``debian_template``); every test runs on a
fresh clone, as a user's would.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest

from pytest_vmenv.backend import Backend, Session, Snapshot
from pytest_vmenv.images import builder_problem
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

GET = "exec 3<>/dev/tcp/127.0.0.1/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
"""An HTTP request with nothing but bash (minbase has no HTTP client)."""

pytestmark = pytest.mark.skipif(builder_problem() is not None, reason=str(builder_problem()))


@pytest.fixture(scope="module", params=["emulator", "libvirt"])
def target(
    request: pytest.FixtureRequest, debian_spec: MachineSpec
) -> Iterator[tuple[Backend, Snapshot, MachineSpec, Session]]:
    """(backend, template, spec, session) of one backend."""
    if request.param == "libvirt":
        backend = request.getfixturevalue("libvirt_backend")
        snap = request.getfixturevalue("debian_template")
        yield backend, snap, debian_spec, request.getfixturevalue("debian_session")
        return
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the emulator's Debian guests run here as root")
    from pytest_vmenv.emulator import EmulatorBackend

    emulator = EmulatorBackend(state_dir=state_dir())
    emulator.check()
    spec = replace(debian_spec, backend="emulator", timeout=120)
    session = Session(id="both-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="bo")
    snap = emulator.build_template(spec, "both-" + session.id, session)
    try:
        yield emulator, snap, spec, session
    finally:
        emulator.remove_template(snap)
        emulator.close()


@pytest.fixture
def machine(target: tuple[Backend, Snapshot, MachineSpec, Session]) -> Iterator[Machine]:
    backend, snap, spec, session = target
    spec = replace(spec, name="both")
    ref = backend.clone(snap, spec, session)
    try:
        yield Machine(backend, ref, spec)
    finally:
        backend.destroy(ref)


def test_os_release_says_bookworm(machine: Machine) -> None:
    assert "VERSION_CODENAME=bookworm" in machine.succeed("cat /etc/os-release")


def test_systemd_is_running_or_degraded(machine: Machine) -> None:
    state = machine.run("systemctl is-system-running --wait", timeout=300).stdout.strip()
    assert state in ("running", "degraded"), machine.run("systemctl --failed").stdout


def test_nginx_is_active_and_serves(machine: Machine) -> None:
    assert machine.succeed("systemctl is-active nginx").strip() == "active"
    page = machine.succeed(["bash", "-c", GET], timeout=60)
    assert "200 OK" in page and "nginx" in page


def test_a_useradd_user_runs_a_command(machine: Machine) -> None:
    machine.succeed("useradd --create-home bob")
    assert machine.succeed("id -un", user="bob").strip() == "bob"


def test_the_hostname_is_the_machines_name(machine: Machine) -> None:
    assert machine.succeed("hostname").strip() == "both"
