"""FileTests: files copied in and out byte for byte, and the size cap on the way out."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..errors import FileTooLarge, VmenvError
from ..machine import Machine

__all__ = ["FileTests"]


class FileTests:
    """``put``/``get``/``write_text``/``read_text`` over ``copy_in``/``copy_out``."""

    def test_files_in_and_out(self, clone: Machine, tmp_path: Path) -> None:
        src = tmp_path / "in.bin"
        src.write_bytes(bytes(range(256)) * 100)
        clone.put(src, "/var/tmp/in.bin")
        assert clone.succeed("wc -c < /var/tmp/in.bin").strip() == "25600"
        clone.get("/var/tmp/in.bin", tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        clone.write_text("/var/tmp/t.txt", "text ✓\n")
        assert clone.read_text("/var/tmp/t.txt") == "text ✓\n"
        with pytest.raises(VmenvError):
            clone.get("/no/such/file", tmp_path / "missing")

    def test_get_refuses_a_file_over_max_size(self, clone: Machine, tmp_path: Path) -> None:
        clone.succeed("head -c 100000 /dev/zero > /var/tmp/big")
        with pytest.raises(FileTooLarge):
            clone.get("/var/tmp/big", tmp_path / "big", max_size=50000)
        assert not (tmp_path / "big").exists()
        clone.get("/var/tmp/big", tmp_path / "big", max_size=100000)
        assert (tmp_path / "big").read_bytes() == bytes(100000)
