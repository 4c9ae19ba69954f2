"""What a command gives back: :class:`Result`, and the bounded :class:`Output` it is read into."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GET_LIMIT", "OUTPUT_LIMIT", "Output", "Result"]


OUTPUT_LIMIT = 16 * 1024 * 1024
"""Bytes of each output stream (stdout, stderr) a ``run`` keeps in memory by default."""

GET_LIMIT = 1024 * 1024 * 1024
"""Largest file ``get``/``read_bytes`` copy out of a machine by default (its logical size)."""


class Output:
    """One output stream of a command as it is read: at most ``limit`` bytes are kept.

    Bytes past ``limit`` are counted in :attr:`dropped` and thrown away, so a command that
    floods its output costs bounded memory however long it runs. Chunks are kept as read and
    joined once, by :meth:`value`.
    """

    __slots__ = ("_chunks", "dropped", "kept", "limit")

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = max(0, limit)
        self.kept = 0
        self.dropped = 0
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        room = self.limit - self.kept
        if len(data) <= room:
            if data:
                self._chunks.append(data)
                self.kept += len(data)
            return
        if room > 0:
            self._chunks.append(data[:room])
            self.kept += room
        self.dropped += len(data) - max(room, 0)

    def value(self) -> bytes:
        """What was kept (the first ``limit`` bytes), joined once."""
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]


@dataclass(frozen=True)
class Result:
    """What a command did. ``stdout``/``stderr`` are text (UTF-8, undecodable bytes replaced);
    ``stdout_bytes``/``stderr_bytes`` are exactly what the command wrote, up to a cap.

    Each stream is kept up to ``max_output`` bytes (a keyword of ``run``; default
    :data:`OUTPUT_LIMIT`, 16 MiB). A command that writes more has its first ``max_output``
    bytes here, the count of the bytes past them in ``stdout_dropped``/``stderr_dropped``, and
    ``truncated`` is True. Output that big belongs in a file: redirect it in the machine and
    ``get`` it.
    """

    exit_code: int
    stdout: str
    stderr: str
    duration: float
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @classmethod
    def from_bytes(
        cls,
        exit_code: int,
        stdout: bytes,
        stderr: bytes,
        duration: float,
        *,
        stdout_dropped: int = 0,
        stderr_dropped: int = 0,
    ) -> Result:
        return cls(
            exit_code,
            stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace"),
            duration,
            stdout,
            stderr,
            stdout_dropped,
            stderr_dropped,
        )

    @classmethod
    def from_output(cls, exit_code: int, stdout: Output, stderr: Output, duration: float) -> Result:
        return cls.from_bytes(
            exit_code,
            stdout.value(),
            stderr.value(),
            duration,
            stdout_dropped=stdout.dropped,
            stderr_dropped=stderr.dropped,
        )

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def truncated(self) -> bool:
        """Whether the command wrote more than was kept (see ``stdout_dropped``)."""
        return self.stdout_dropped > 0 or self.stderr_dropped > 0
