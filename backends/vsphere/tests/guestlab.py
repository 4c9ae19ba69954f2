"""Simulated guests behind a real SSH server, for vcsim's VMs (which have no guest at all).

vcsim gives a VM an IP only through the simulator knob ``SET.guest.ipAddress`` and runs
nothing behind it. The lab stands in for the guest: an asyncssh server on 127.0.0.1, one
listening port per VM (vcsim can only hand every clone the same address, 127.0.0.1), that
runs each command as a local process in its own mount and UTS namespaces (``unshare``):

* the guest's ``/var/tmp`` and ``/tmp`` are bind mounts of the guest's own directories
  under the state dir, so clones do not see each other's files;
* the hostname is the one the backend published for the guest in ``guestinfo.metadata``
  (``local-hostname``, the key cloud-init's VMware datasource reads);
* a guest whose VM no longer exists in vcsim drops its connections, as a deleted VM would;
* a guest's directories start as a copy of its parent VM's (the template it was cloned
  from), standing in for the linked-clone disk that vcsim does not give the clone.

It is the guest side only: commands, files and SSH travel through the product's real code
(``pytest_vmenv.channel``). It needs root (``unshare --mount``), as the CI runs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import asyncssh

_GUEST = (
    'hostname "$1" && mount --bind "$2" /var/tmp && mount --bind "$3" /tmp && cd / && '
    'exec /bin/sh -c "$4"'
)


class GuestLab:
    """A pool of simulated guests keyed by VM moref; start() before use, stop() after."""

    def __init__(self, root: Path, password: str) -> None:
        self.root = root
        self.password = password
        self.key_path = root / "client_key"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._ports: dict[str, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._lock = threading.Lock()
        self.exists: Any = lambda moref: True  # set by the fixture: does the VM still exist?

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(self.key_path))
        self.key_path.chmod(0o600)
        self._authorized = asyncssh.import_authorized_keys(key.export_public_key().decode())
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._thread.start()

    def stop(self) -> None:
        async def _stop() -> None:
            for server in self._servers:
                server.close()

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def port_for(self, moref: str, hostname: str, parent: str | None) -> int:
        """The SSH port of VM ``moref``'s guest, created (from ``parent``'s files) on first use."""
        with self._lock:
            if moref in self._ports:
                return self._ports[moref]
            guest = self.root / "guests" / moref
            if not guest.exists():
                source = self.root / "guests" / parent if parent else None
                if source is not None and source.exists():
                    shutil.copytree(source, guest, symlinks=True)
                else:
                    for sub in ("var-tmp", "tmp"):
                        (guest / sub).mkdir(parents=True, exist_ok=True)
                        (guest / sub).chmod(0o1777)
            port = asyncio.run_coroutine_threadsafe(
                self._listen(moref, guest, hostname), self.loop
            ).result(10)
            self._ports[moref] = port
            return port

    async def _listen(self, moref: str, guest: Path, hostname: str) -> int:
        lab = self

        class Server(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                return username == "root" and password == lab.password

            def public_key_auth_supported(self) -> bool:
                return True

            def validate_public_key(self, username: str, key: Any) -> bool:
                return (
                    username == "root"
                    and lab._authorized.validate(key, "127.0.0.1", None) is not None
                )

        async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
            if not lab.exists(moref):  # a destroyed VM's guest stops answering
                process.get_extra_info("connection").abort()
                return
            command = process.command or "exec /bin/sh -i"
            argv = ["unshare", "--mount", "--uts", "--fork", "/bin/sh", "-c", _GUEST, "guest",
                    hostname, str(guest / "var-tmp"), str(guest / "tmp"), command]  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await process.redirect(stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr)
            code = await proc.wait()
            await process.stdout.drain()
            await process.stderr.drain()
            process.exit(code if code >= 0 else 128 - code)
            await process.wait_closed()

        server = await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[self._host_key],
            process_factory=handle, encoding=None,
        )  # fmt: skip
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port


def hostname_of(extra_config: dict[str, str]) -> str:
    """The ``local-hostname`` of a VM's ``guestinfo.metadata`` (as cloud-init reads it)."""
    meta = json.loads(extra_config.get("guestinfo.metadata", "{}") or "{}")
    return str(meta.get("local-hostname", "localhost"))
