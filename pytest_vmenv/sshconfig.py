"""``vm.ssh_config()``'s answer, :class:`SSHConfig`, and the session's key pair.

What ``vm.ssh_config()`` does in the guest is in :mod:`.sshsetup`. The key pair is one
ed25519 pair per session (``ssh-keygen``), in the session's scratch dir under the state dir
(mode 0700, removed with it at the session's end), made under a lock so the machines of one
session share it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .ledger import flocked

__all__ = ["SSHConfig", "session_key"]


@dataclass(frozen=True)
class SSHConfig:
    """How a real SSH client reaches one machine: ``ssh -i KEY -p PORT USER@HOST``.

    ``key_file`` is the private key (its public half is authorized for ``user``);
    ``known_hosts`` holds the machine's own host keys for ``[host]:port``.
    """

    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path

    @property
    def destination(self) -> str:
        """``user@host``, as ``ssh`` takes it (``scp``: ``f"{destination}:PATH"``)."""
        return f"{self.user}@{self.host}"

    def options(self) -> list[str]:
        """The options ``ssh`` and ``scp`` share: this key only, the pinned host keys, no
        prompt and no ssh_config file of the user's or the host's."""
        return [
            "-F", "none", "-i", str(self.key_file),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"UserKnownHostsFile={_quoted(self.known_hosts)}",
        ]  # fmt: skip

    def ssh_argv(self, *command: str) -> list[str]:
        """``ssh ... user@host [command...]``: run it with ``subprocess``."""
        return ["ssh", *self.options(), "-p", str(self.port), self.destination, *command]

    def scp_argv(self, *paths: str) -> list[str]:
        """``scp ... paths...``; a path in the machine is ``f"{config.destination}:PATH"``."""
        return ["scp", *self.options(), "-P", str(self.port), *paths]


def _quoted(path: Path) -> str:
    """``path`` as one ssh option value: in double quotes (spaces), ``%`` doubled (ssh expands
    ``%``-tokens in this option)."""
    text = str(path)
    if '"' in text:
        raise ConfigError(f"{text}: ssh cannot take a known-hosts path with a double quote")
    return '"' + text.replace("%", "%%") + '"'


def session_key(scratch: Path) -> Path:
    """The session's private key (made once, under a lock), with ``.pub`` beside it."""
    where = scratch / "ssh"
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = where / "id_ed25519"
    with flocked(where / ".lock"):
        if key.exists() and key.with_suffix(".pub").exists():
            return key
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            raise ConfigError(
                "vm.ssh_config() makes its key pair with ssh-keygen, which is not on PATH: "
                "install the OpenSSH client (Debian: apt-get install openssh-client)"
            )
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        argv = [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "pytest-vmenv", "-f", str(key)]
        subprocess.run(argv, check=True, capture_output=True)
    return key
