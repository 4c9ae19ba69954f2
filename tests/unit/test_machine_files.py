"""``Machine.write_text``/``write_bytes`` hand the backend a file of mode 0644.

Backends copy a local file's mode along (the emulator and libvirt do), so the temporary file
behind ``write_text`` decides the guest file's mode: a 0600 file there made pages written with
``write_text`` unreadable to nginx's workers.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import cast

from pytest_vmenv.backend import Backend, MachineRef
from pytest_vmenv.machine import Machine
from pytest_vmenv.spec import MachineSpec

REF = MachineRef(backend="fake", id="m1", name="web", session="s")


class _Recorder:
    name = "fake"

    def __init__(self) -> None:
        self.copied: list[tuple[str, int, bytes]] = []

    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        self.copied.append((dst, stat.S_IMODE(src.stat().st_mode), src.read_bytes()))


def test_write_text_and_write_bytes_make_0644_files(tmp_path: Path) -> None:
    backend = _Recorder()
    vm = Machine(cast(Backend, backend), REF, MachineSpec(name="web"), tmp_path)
    vm.write_text("/var/www/html/index.html", "hello ✓\n")
    vm.write_bytes("/srv/blob", b"\x00\x01")
    assert backend.copied == [
        ("/var/www/html/index.html", 0o644, "hello ✓\n".encode()),
        ("/srv/blob", 0o644, b"\x00\x01"),
    ]


def test_put_keeps_the_local_files_mode(tmp_path: Path) -> None:
    backend = _Recorder()
    vm = Machine(cast(Backend, backend), REF, MachineSpec(name="web"), tmp_path)
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o750)
    vm.put(script, "/usr/local/bin/run.sh")
    assert backend.copied == [("/usr/local/bin/run.sh", 0o750, b"#!/bin/sh\n")]
