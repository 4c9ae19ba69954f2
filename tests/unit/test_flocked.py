"""``ledger.flocked``: exclusive, shared, and not waited for, on real ``flock`` locks.

Each ``flocked`` opens the file anew, so two of them in one process conflict as two processes'
would (``flock`` locks belong to the open file description).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pytest_vmenv.ledger import flocked


def taken(lock: Path, *, shared: bool = False) -> bool:
    """Whether ``flocked(lock, shared=shared, wait=False)`` gets the lock now."""
    try:
        with flocked(lock, shared=shared, wait=False):
            return True
    except BlockingIOError:
        return False


def test_shared_holders_coexist_and_keep_an_exclusive_one_out(tmp_path: Path) -> None:
    lock = tmp_path / "image.lock"
    with flocked(lock, shared=True):
        assert taken(lock, shared=True) and not taken(lock)
    with flocked(lock):
        assert not taken(lock, shared=True) and not taken(lock)
    assert taken(lock)


def test_a_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    lock = tmp_path / "image.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, fcntl; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", lock],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert not taken(lock, shared=True)
    finally:
        holder.kill()
        holder.wait()
    assert taken(lock)
