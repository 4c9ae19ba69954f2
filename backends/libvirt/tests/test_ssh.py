"""SSH as the command channel, against a real guest with no agent at all.

The ``tiny = "ssh"`` image runs dropbear and no qemu-ga. Its template is built over SSH on a
private build network; a clone joins an isolated ``lan`` network, its address comes from the
network's DHCP leases, and commands, stdin, files and a timeout go over SSH with the key this
test generates (kept under the state dir, removed at the end).
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncssh
import libvirt
import libvirt_qemu
import pytest
from vmenv_libvirt import LibvirtBackend

from pytest_vmenv.backend import MachineRef, Network, Session, Snapshot
from pytest_vmenv.errors import CommandTimeout, ConfigError
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec


@pytest.fixture(scope="module")
def key_dir() -> Iterator[Path]:
    d = state_dir() / "libvirt-test" / ("ssh-" + secrets.token_hex(4))
    d.mkdir(parents=True, mode=0o700)
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(d / "id_ed25519"))
    (d / "id_ed25519").chmod(0o600)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(id="lvs-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="lvs")


def _spec(key_dir: Path, **cfg: object) -> MachineSpec:
    config = {"tiny": "ssh", "agent": False, "ssh_key": str(key_dir / "id_ed25519"), **cfg}
    return MachineSpec(
        name="sshvm",
        image="tiny-ssh",
        backend="libvirt",
        memory=256 * 1024**2,
        timeout=120,
        provision=("echo provisioned-over-ssh > /etc/motd",),
        image_config=config,
    )


@pytest.fixture(scope="module")
def template(
    libvirt_backend: LibvirtBackend, session: Session, key_dir: Path
) -> Iterator[Snapshot]:
    spec = _spec(key_dir)
    snap = libvirt_backend.build_template(spec, "lvs-" + session.id, session)
    yield snap
    libvirt_backend.remove_template(snap)


@pytest.fixture(scope="module")
def machine(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session, key_dir: Path
) -> Iterator[MachineRef]:
    spec = replace(_spec(key_dir), network="lan")
    ref = libvirt_backend.clone(template, spec, session, Network("lan", secrets.token_hex(3)))
    yield ref
    libvirt_backend.destroy(ref)


def test_template_is_built_over_ssh(template: Snapshot) -> None:
    ssh = template.data["boot"]["ssh"]
    assert ssh["user"] == "root" and ssh["key"].endswith("id_ed25519")
    assert not template.data["ram"]  # no RAM-state fast path: SSH clones always join a network


def test_commands_over_ssh_with_no_agent(
    libvirt_backend: LibvirtBackend, machine: MachineRef
) -> None:
    assert machine.ip and machine.ip.startswith("10.")
    assert machine.data["ssh"]["user"] == "root"
    # There really is no agent: the channel can only be SSH.
    with pytest.raises(libvirt.libvirtError):
        libvirt_backend.hv.call(
            lambda c: libvirt_qemu.qemuAgentCommand(
                c.lookupByName(machine.id), '{"execute":"guest-ping"}', 2, 0
            )
        )
    r = libvirt_backend.execute(machine, ["/bin/sh", "-c", "cat /etc/motd; hostname; id -u"])
    assert r.exit_code == 0 and r.stdout == "provisioned-over-ssh\nsshvm\n0\n"
    r = libvirt_backend.execute(machine, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = libvirt_backend.execute(machine, ["/bin/sh", "-c", "kill -9 $$"])
    assert r.exit_code == 137
    assert libvirt_backend.execute(machine, ["no-such-program"]).exit_code == 127
    blob = bytes(range(256)) * 64
    r = libvirt_backend.execute(machine, ["cat"], input=blob)
    assert r.exit_code == 0 and r.stdout_bytes == blob
    r = libvirt_backend.execute(
        machine, ["/bin/sh", "-c", 'echo "$GREETING"'], env={"GREETING": "hi"}
    )
    assert r.stdout == "hi\n"
    started = time.monotonic()
    r = libvirt_backend.execute(machine, ["/bin/sh", "-c", "sleep 60 >/dev/null 2>&1 & echo bg"])
    assert r.stdout == "bg\n" and time.monotonic() - started < 10


def test_files_over_ssh(
    libvirt_backend: LibvirtBackend, machine: MachineRef, key_dir: Path
) -> None:
    src = key_dir / "payload.bin"
    data = secrets.token_bytes(200_000)
    src.write_bytes(data)
    src.chmod(0o750)
    libvirt_backend.copy_in(machine, src, "/root/payload.bin")
    r = libvirt_backend.execute(machine, ["/bin/sh", "-c", "stat -c %a /root/payload.bin"])
    assert r.stdout.strip() == "750"
    back = key_dir / "back.bin"
    libvirt_backend.copy_out(machine, "/root/payload.bin", back)
    assert back.read_bytes() == data


def test_timeout_over_ssh_kills_the_command(
    libvirt_backend: LibvirtBackend, machine: MachineRef
) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        libvirt_backend.execute(
            machine, ["/bin/sh", "-c", "echo $$ >/tmp/victim; sleep 30"], timeout=1.5
        )
    assert time.monotonic() - started < 12
    r = libvirt_backend.execute(machine, ["/bin/sh", "-c", 'kill -0 "$(cat /tmp/victim)"'])
    assert r.exit_code != 0  # its process group was killed
    assert libvirt_backend.execute(machine, ["true"]).exit_code == 0  # the channel still works


def test_ssh_machine_without_network_is_a_clear_error(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session, key_dir: Path
) -> None:
    with pytest.raises(ConfigError, match="network"):
        libvirt_backend.clone(template, _spec(key_dir), session)


def test_snapshot_and_revert_reconnect_over_ssh(
    libvirt_backend: LibvirtBackend, machine: MachineRef
) -> None:
    snap = libvirt_backend.snapshot(machine, "before")
    libvirt_backend.execute(machine, ["/bin/sh", "-c", "echo later > /root/later"])
    libvirt_backend.revert(machine, snap)  # the guest's TCP state is the snapshot's
    r = libvirt_backend.execute(machine, ["/bin/sh", "-c", "test -e /root/later"])
    assert r.exit_code == 1


def test_auto_falls_back_to_ssh_when_the_agent_is_silent(
    libvirt_backend: LibvirtBackend, session: Session, key_dir: Path
) -> None:
    spec = _spec(key_dir, agent="auto", agent_wait=2)
    started = time.monotonic()
    snap = libvirt_backend.build_template(spec, "lvs-auto-" + session.id, session)
    try:
        assert snap.data["boot"]["ssh"]["user"] == "root"
        assert time.monotonic() - started < 60
    finally:
        libvirt_backend.remove_template(snap)
