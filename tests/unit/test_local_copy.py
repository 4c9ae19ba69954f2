"""local_copy: chunks land as the guest has them (zeros as holes); a failed copy leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_vmenv.channel import local_copy

BLOCK = 1 << 16


def test_zero_chunks_become_holes_and_the_size_is_what_was_written(tmp_path: Path) -> None:
    dst = tmp_path / "disk.img"
    with local_copy(dst) as out:
        out.write(b"head")
        for _ in range(64):
            out.write(bytes(BLOCK))
        out.write(b"tail")
    data = dst.read_bytes()
    assert len(data) == out.size == 8 + 64 * BLOCK
    assert data[:4] == b"head" and data[-4:] == b"tail" and data[4:-4].count(0) == 64 * BLOCK
    assert os.stat(dst).st_blocks * 512 < 16 * BLOCK  # 4 MiB of zeros took (almost) no blocks


def test_a_trailing_hole_still_counts_in_the_size(tmp_path: Path) -> None:
    dst = tmp_path / "f"
    with local_copy(dst) as out:
        out.write(b"x")
        out.write(bytes(BLOCK))
    assert dst.stat().st_size == 1 + BLOCK


def test_a_failed_copy_leaves_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "f"
    with pytest.raises(ConnectionError), local_copy(dst) as out:
        out.write(b"partial")
        raise ConnectionError("dropped")
    assert not dst.exists()
