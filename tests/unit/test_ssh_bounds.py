"""The SSH channel's bounds, against a real SSH server: output held, files copied out.

The server is asyncssh on 127.0.0.1 that runs each command as a local ``/bin/sh`` process
(``$TMPDIR`` in the test's own directory), standing in for a guest's sshd. Sizes are small:
a few MiB of zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

asyncssh = pytest.importorskip("asyncssh")

from pytest_vmenv import errors  # noqa: E402
from pytest_vmenv.channel import SSHChannel  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHChannel]:
    root = tmp_path_factory.mktemp("sshd")
    client = asyncssh.generate_private_key("ssh-ed25519")
    client.write_private_key(str(root / "key"))
    (root / "key").chmod(0o600)
    authorized = asyncssh.import_authorized_keys(client.export_public_key().decode())
    env = {**os.environ, "TMPDIR": str(root)}
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    class Server(asyncssh.SSHServer):  # type: ignore[misc]
        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: Any) -> bool:
            return authorized.validate(key, "127.0.0.1", None) is not None

    async def pump(src: Any, dst: Any) -> None:
        try:
            while chunk := await src.read(1 << 16):
                dst.write(chunk)
                await dst.drain()
        except (asyncssh.Error, OSError):  # the client closed the channel early, as sshd allows
            pass
        finally:
            if isinstance(dst, asyncio.StreamWriter):
                dst.close()

    async def handle(process: Any) -> None:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", process.command, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.gather(
            pump(process.stdin, proc.stdin),
            pump(proc.stdout, process.stdout),
            pump(proc.stderr, process.stderr),
        )
        code = await proc.wait()
        with contextlib.suppress(asyncssh.Error, OSError):
            process.exit(code if code >= 0 else 128 - code)

    async def listen() -> Any:
        return await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            process_factory=handle, encoding=None,
        )  # fmt: skip

    server = asyncio.run_coroutine_threadsafe(listen(), loop).result(10)
    port = server.sockets[0].getsockname()[1]
    chan = SSHChannel("127.0.0.1", port, os.environ.get("USER", "root"), key=root / "key",
                      machine="sshvm")  # fmt: skip
    yield chan
    chan.close()
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)


def test_ssh_output_is_capped_per_stream(channel: SSHChannel) -> None:
    r = channel.execute(["/bin/sh", "-c", "head -c 5000000 /dev/zero; echo err >&2"],
                        max_output=MiB)  # fmt: skip
    assert (len(r.stdout_bytes), r.stdout_dropped) == (MiB, 5_000_000 - MiB)
    assert (r.stderr, r.truncated, r.exit_code) == ("err\n", True, 0)
    assert not channel.execute(["echo", "hi"]).truncated


def test_ssh_copy_out_streams_keeps_holes_and_refuses_over_max_size(
    channel: SSHChannel, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(8 * MiB)
        f.write(b"tail")
    out = tmp_path / "out"
    channel.copy_out(str(src), out)
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 < MiB  # the zeros between are a hole again
    with pytest.raises(errors.FileTooLarge, match="max_size=1048576"):
        channel.copy_out(str(src), tmp_path / "refused", max_size=MiB)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(errors.BackendError, match="No such file"):
        channel.copy_out(str(tmp_path / "missing"), tmp_path / "m")
    assert not (tmp_path / "m").exists()
