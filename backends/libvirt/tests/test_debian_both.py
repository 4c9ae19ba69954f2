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
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_vmenv.backend import Backend, Forwarder, Session, Snapshot
from pytest_vmenv.errors import BackendError
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


def test_testinfra_reports_packages_services_sockets_files_and_users(machine: Machine) -> None:
    """The same on both backends: installed or not, running or not after ``systemctl stop``,
    listening or not. The rest (versions, a file's owner and mode, a user) only on the
    emulator: through libvirt's guest agent under TCG each of testinfra's commands is a round
    trip of 1-4 s, and these modules use the same adapter."""
    pytest.importorskip("testinfra", reason="the testinfra extra is not installed")
    host = machine.testinfra(timeout=60)
    assert host.package("nginx").is_installed and not host.package("apache2").is_installed
    assert host.service("nginx").is_running
    assert host.socket("tcp://0.0.0.0:80").is_listening
    if machine.backend.name == "emulator":
        assert host.package("nginx").version.startswith("1.22")
        assert host.service("nginx").is_enabled
        assert not host.socket("tcp://0.0.0.0:8080").is_listening
        conf = host.file("/etc/nginx/nginx.conf")
        assert (conf.user, conf.group, conf.mode) == ("root", "root", 0o644)
        assert conf.contains("^user www-data;")
        www = host.user("www-data")
        assert www.exists and www.shell == "/usr/sbin/nologin" and www.home == "/var/www"
    machine.succeed("systemctl stop nginx")
    assert not host.service("nginx").is_running
    assert not host.socket("tcp://0.0.0.0:80").is_listening


def _client(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stderr}"
    return done.stdout


def test_ssh_config_logs_the_openssh_client_in(machine: Machine, tmp_path: Path) -> None:
    """On the emulator: ssh and scp log in through vm.forward(22) with the session's key. On
    libvirt, which has no forward yet, ssh_config refuses with the reason."""
    if not isinstance(machine.backend, Forwarder):
        with pytest.raises(BackendError, match=r"forward\(22\), which the 'libvirt' backend"):
            machine.ssh_config()
        return
    config = machine.ssh_config()
    assert (config.host, config.port) == machine.forward(22) and config.user == "root"
    assert config.key_file.is_relative_to(state_dir())
    _client(config.ssh_argv("true"))
    assert "VERSION_CODENAME=bookworm" in _client(config.ssh_argv("cat", "/etc/os-release"))
    assert _client(config.ssh_argv("hostname")).strip() == "both"
    data = os.urandom(300_000)
    (tmp_path / "up").write_bytes(data)
    _client(config.scp_argv(str(tmp_path / "up"), f"{config.destination}:/root/up"))
    assert machine.read_bytes("/root/up") == data
    _client(config.scp_argv(f"{config.destination}:/root/up", str(tmp_path / "down")))
    assert (tmp_path / "down").read_bytes() == data
    machine.succeed("useradd --create-home alice")
    alice = machine.ssh_config("alice")
    assert _client(alice.ssh_argv("id", "-un")).strip() == "alice"
    assert machine.succeed("stat -c '%U %a' /home/alice/.ssh/authorized_keys") == "alice 600\n"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")])
    other = replace(alice, key_file=tmp_path / "k")
    refused = subprocess.run(other.ssh_argv("true"), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    impostor = tmp_path / "known_hosts"  # another key pinned for [host]:port: refused
    impostor.write_text(f"[{config.host}]:{config.port} {(tmp_path / 'k.pub').read_text()}")
    checked = replace(config, known_hosts=impostor).ssh_argv("true")
    refused = subprocess.run(checked, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr
    machine.succeed("systemctl stop ssh")
    assert 22 not in machine.listening_ports()
    _client(machine.ssh_config().ssh_argv("true"))  # started again, by systemctl
    assert machine.succeed("systemctl is-active ssh").strip() == "active"
