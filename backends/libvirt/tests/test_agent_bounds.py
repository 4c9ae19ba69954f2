"""What the guest-agent channel keeps of a command's output and of a file: bounded.

Pure logic against a scripted agent (``send`` answers the qemu-ga commands the way qemu-ga
does, from in-memory files): the real-guest runs are the conformance suite's
``test_output_is_capped_per_stream`` and ``test_get_refuses_a_file_over_max_size``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from vmenv_libvirt.agent import CHUNK, Agent

from pytest_vmenv import errors

MiB = 1024 * 1024


class ScriptedAgent:
    """qemu-ga's exec and file commands over in-memory files; records every read's size."""

    def __init__(self, files: dict[str, bytes], out_data: bytes) -> None:
        self.files = files
        self.out_data = out_data
        self.reads: list[int] = []
        self.handles: dict[int, list[Any]] = {}

    def send(self, text: str, timeout: int) -> str:
        msg = json.loads(text)
        cmd, args = msg["execute"], msg.get("arguments", {})
        ret: Any
        if cmd == "guest-exec":
            ret = {"pid": 7}
        elif cmd == "guest-exec-status":
            ret = {
                "exited": True,
                "exitcode": 0,
                "out-data": base64.b64encode(self.out_data).decode(),
            }
        elif cmd == "guest-file-open":
            handle = len(self.handles) + 1
            self.handles[handle] = [self.files[args["path"]], 0]
            ret = handle
        elif cmd == "guest-file-read":
            data, pos = self.handles[args["handle"]]
            self.reads.append(args["count"])
            chunk = data[pos : pos + args["count"]]
            self.handles[args["handle"]][1] = pos + len(chunk)
            ret = {"count": len(chunk), "buf-b64": base64.b64encode(chunk).decode(),
                   "eof": pos + len(chunk) >= len(data)}  # fmt: skip
        else:
            ret = {}
        return json.dumps({"return": ret})


def test_agent_output_read_stops_at_max_output() -> None:
    out, err = b"o" * (5 * MiB), b"e" * 10
    fake = ScriptedAgent(
        {"/run/vmenv/t.o": out, "/run/vmenv/t.e": err},
        f"vmenv-files {len(out)} {len(err)} /run/vmenv/t.o /run/vmenv/t.e\n".encode(),
    )
    r = Agent(fake.send).execute(["cat", "big"], max_output=MiB)
    assert (len(r.stdout_bytes), r.stdout_dropped, r.stderr, r.truncated) == (
        MiB, 4 * MiB, "e" * 10, True,
    )  # fmt: skip
    assert sum(fake.reads) <= MiB + CHUNK  # the rest never left the guest


def test_agent_inline_output_is_cut_to_max_output() -> None:
    fake = ScriptedAgent({}, b"vmenv-inline 6 3\nabcdefERR")
    r = Agent(fake.send).execute(["x"], max_output=4)
    assert (r.stdout, r.stdout_dropped, r.stderr, r.stderr_dropped) == ("abcd", 2, "ERR", 0)


def test_agent_copy_out_refuses_over_max_size_and_keeps_holes(tmp_path: Path) -> None:
    data = b"head" + bytes(3 * CHUNK) + b"tail"
    fake = ScriptedAgent({"/f": data}, b"")
    agent = Agent(fake.send)
    with pytest.raises(errors.FileTooLarge, match="max_size=1000"):
        agent.copy_out("/f", tmp_path / "refused", max_size=1000, machine="vm1")
    assert not (tmp_path / "refused").exists()
    agent.copy_out("/f", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert (tmp_path / "out").stat().st_blocks * 512 < 2 * CHUNK
