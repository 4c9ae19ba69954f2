"""The SSH command channel against the lab's SSH server (the guests of the vSphere tests)."""

from __future__ import annotations

import secrets

import pytest
from guestlab import GuestLab

from pytest_vmenv.channel import SSHChannel
from pytest_vmenv.errors import FileTooLarge
from pytest_vmenv.paths import state_dir


def test_connection_survives_gets_refused_for_their_size() -> None:
    """A get over ``max_size`` ends its stream cleanly, so the next command on the same
    connection works: closing the channel mid-transfer left it dead about one time in four,
    and the next command failed with "SSH connection closed"."""
    lab = GuestLab(state_dir() / "vsphere-lab" / secrets.token_hex(4), password="pw")
    lab.start()
    try:
        port = lab.port_for("vm-1", "g1", None)
        channel = SSHChannel("127.0.0.1", port, "root", key=lab.key_path, known_hosts=None)
        channel.execute(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x > /var/tmp/big"])
        out = lab.root / "out"
        for i in range(30):
            with pytest.raises(FileTooLarge):
                channel.copy_out("/var/tmp/big", out, max_size=50000)
            assert channel.execute(["echo", str(i)]).stdout == f"{i}\n"
        channel.close()
    finally:
        lab.stop()
