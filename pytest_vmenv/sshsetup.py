"""``vm.ssh_config()``: what a real SSH client (``ssh``, ``scp``, ansible) needs to log in to a
machine, reached through ``vm.forward(22)`` on the host's loopback.

What it does, all through the plugin's own channel (as root, with every path resolved in the
guest; nothing on the host touches the guest's files):

* checks that the backend forwards ports (:class:`~pytest_vmenv.backend.Forwarder`) and that
  the image has an SSH server (``sshd``): otherwise an error says what to change, before
  anything is done;
* uses the session's key pair (:func:`.sshconfig.session_key`);
* adds its public key to ``~USER/.ssh/authorized_keys`` in the guest (the home from the
  guest's ``getent passwd``; the other keys there are kept), owned by the user, mode 0600;
* starts sshd when nothing listens on port 22 (``systemctl start ssh`` under systemd, else
  ``sshd`` itself after ``ssh-keygen -A``) and waits for the port;
* pins the guest's host keys (read from ``/etc/ssh/ssh_host_*_key.pub`` through the channel)
  in a known-hosts file of the machine, so the client checks the server it reaches
  (``StrictHostKeyChecking=yes``) instead of trusting the first key it sees.

What it opens: the forward's listener on ``127.0.0.1`` (only this host's processes can
connect) to the guest's port 22, and one authorized key whose private half stays in the state
dir.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .backend import Forwarder
from .errors import BackendError, ConfigError
from .sshconfig import SSHConfig, session_key

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["ssh_config"]

SSH_PORT = 22
_FIND_SSHD = "PATH=$PATH:/usr/sbin:/sbin command -v sshd"
_START_SSHD = (
    "if [ -d /run/systemd/system ]; then systemctl start ssh || systemctl start sshd; "
    'else ssh-keygen -A && mkdir -p -m 755 /run/sshd && "$1"; fi'
)
_MAKE_SSH_DIR = 'mkdir -p "$1" && chown "$2" "$1" && chmod 700 "$1"'
_ADD_KEY = (  # appended in the guest: the other keys stay as they are, whatever their bytes
    'touch "$1" && { grep -qxF -- "$2" "$1" || { [ ! -s "$1" ] || [ -z "$(tail -c 1 "$1")" ] '
    '|| echo >>"$1"; printf \'%s\\n\' "$2" >>"$1"; }; } && chown "$3" "$1" && chmod 600 "$1"'
)


def _authorize(machine: Machine, user: str, public_key: str) -> None:
    """Add ``public_key`` to ``user``'s authorized_keys in the guest (paths from the guest)."""
    entry = machine.run(["getent", "passwd", user])
    fields = entry.stdout.strip().split(":")
    if entry.exit_code != 0 or len(fields) < 7:
        raise ConfigError(f"{machine.name}: vm.ssh_config(user={user!r}): no such user there")
    owner, home = f"{fields[2]}:{fields[3]}", fields[5]
    ssh_dir = f"{home.rstrip('/')}/.ssh"
    machine.succeed(["sh", "-c", _MAKE_SSH_DIR, "sh", ssh_dir, owner])
    keys = f"{ssh_dir}/authorized_keys"
    machine.succeed(["sh", "-c", _ADD_KEY, "sh", keys, public_key, owner])


def _pin_host_keys(machine: Machine, host: str, port: int, path: Path) -> None:
    keys = machine.run(["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"])
    lines = [line.split()[:2] for line in keys.stdout.splitlines() if len(line.split()) >= 2]
    if keys.exit_code != 0 or not lines:
        raise BackendError(
            f"{machine.name}: sshd has no host keys in /etc/ssh (ssh_host_*_key.pub): "
            f"{keys.stderr.strip()}"
        )
    name = f"[{host}]:{port}"
    path.write_text("".join(f"{name} {kind} {blob}\n" for kind, blob in lines))


def ssh_config(machine: Machine, user: str, scratch: Path) -> SSHConfig:
    """See the module docstring."""
    backend = machine.backend
    if not isinstance(backend, Forwarder):
        raise BackendError(
            f"{machine.name}: vm.ssh_config() reaches sshd through vm.forward(22), which the "
            f"{backend.name!r} backend does not offer yet: run this test on backend='emulator', "
            "or use vm.run/vm.testinfra(), which need no SSH"
        )
    found = machine.run(["sh", "-c", _FIND_SSHD])
    if found.exit_code != 0:
        raise ConfigError(
            f"{machine.name}: vm.ssh_config() needs an SSH server in the image, and it has no "
            "sshd: add openssh-server to its packages (packages=['openssh-server'])"
        )
    key = session_key(scratch)
    _authorize(machine, user, key.with_suffix(".pub").read_text().strip())
    if SSH_PORT not in machine.listening_ports():
        machine.succeed(["sh", "-c", _START_SSHD, "sh", found.stdout.strip()], timeout=60)
        machine.wait_for_port(SSH_PORT, timeout=30)
    host, port = machine.forward(SSH_PORT)
    known_hosts = key.parent / f"known_hosts-{re.sub(r'[^A-Za-z0-9_.-]', '_', machine.ref.id)}"
    _pin_host_keys(machine, host, port, known_hosts)
    os.chmod(known_hosts, 0o600)
    return SSHConfig(host, port, user, key, known_hosts)
