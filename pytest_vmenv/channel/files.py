"""Files copied out of a machine, written locally as the guest has them: holes stay holes.

Every channel streams a guest file in chunks; :func:`local_copy` is where those chunks land. A
chunk of zeros is skipped over instead of written (a sparse disk image of 10 GiB costs what
its data costs), the file is sized to what was received at the end, and if anything fails
before that, nothing is left at the destination.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["LocalCopy", "local_copy"]


class LocalCopy:
    """The local end of a copy: ``write`` each chunk in order; ``size`` is what was written."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.size = 0

    def write(self, chunk: bytes) -> bool:
        """Write ``chunk`` (a run of zeros as a hole); True, so it serves as a sink callback."""
        if chunk.count(0) == len(chunk):
            self._file.seek(len(chunk), os.SEEK_CUR)
        else:
            self._file.write(chunk)
        self.size += len(chunk)
        return True


@contextlib.contextmanager
def local_copy(dst: Path | str) -> Iterator[LocalCopy]:
    """``dst`` opened for a copy: sized to what was written when the block ends, removed if
    the block raises."""
    path = Path(dst)
    try:
        with open(path, "wb") as f:
            copy = LocalCopy(f)
            yield copy
            f.truncate(copy.size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
