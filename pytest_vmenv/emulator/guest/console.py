"""The guest's ``/dev/console``: a FIFO relayed into a size-capped ``console.log``.

A guest writes its console as much as it likes; the host's disk must not pay for it. So
``/dev/console`` is a FIFO (``<guestdir>/console.fifo``, bound there by PID 1) and the
guest's keeper (see :mod:`.keeper`), which lives outside the guest's PID namespace and
waits for its PID 1 anyway, copies what arrives into ``console.log``. When that file
reaches :data:`CONSOLE_LIMIT` it becomes ``console.log.1`` (replacing the previous one) and
a new ``console.log`` starts with a line saying so: the host keeps at most twice the limit,
always the newest output.

The keeper's root directory becomes the guest's when PID 1 pivots (they share the mount
namespace), so every file here is reached through a descriptor of the guest dir opened
before: never by a path a guest could plant something at.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat

__all__ = ["CONSOLE_LIMIT", "FIFO", "LOG", "Relay"]

CONSOLE_LIMIT = 4 * 1024 * 1024
"""Bytes of console output per file; ``console.log`` plus ``console.log.1`` hold the newest."""

FIFO = "console.fifo"
LOG = "console.log"
_OLD = LOG + ".1"
_CHUNK = 1 << 16
_BURST = 1 << 20  # bytes relayed per wake-up before polling again


class Relay:
    """Copies the console FIFO of the guest dir ``gdir`` into its rotated log."""

    def __init__(self, gdir: str, limit: int = CONSOLE_LIMIT) -> None:
        self.limit = max(limit, 4096)  # room for the rotation line
        self.rotations = 0
        self.dir = os.open(gdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fifo = self.log = -1
        try:
            # O_RDWR: a reader is always there (writers never block in open, never see
            # EPIPE) and the FIFO never reports end-of-file when a writer closes it
            self.fifo = os.open(FIFO, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dir)
            if not stat.S_ISFIFO(os.fstat(self.fifo).st_mode):
                raise OSError(f"{gdir}/{FIFO} is not a FIFO")
            self.log = self._open(os.O_APPEND)
            self.size = os.fstat(self.log).st_size
        except BaseException:
            self.close()
            raise

    def _open(self, mode: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | mode
        return os.open(LOG, flags, 0o600, dir_fd=self.dir)

    def close(self) -> None:
        for fd in (self.fifo, self.log, self.dir):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fifo = self.log = self.dir = -1

    def serve(self, pid: int) -> None:
        """Relay until the child ``pid`` (PID 1) exits; reap it, relay what is left, close."""
        pidfd = os.pidfd_open(pid)
        poll = select.poll()
        poll.register(self.fifo, select.POLLIN)
        poll.register(pidfd, select.POLLIN)
        try:
            while True:
                try:
                    events = poll.poll()
                except InterruptedError:
                    continue
                if any(fd == pidfd for fd, _ev in events):
                    break
                self._relay()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._relay()
        finally:
            os.close(pidfd)
            self.close()

    def _relay(self) -> None:
        """Copy what the FIFO holds now, at most one burst."""
        budget = _BURST
        while budget > 0:
            try:
                chunk = os.read(self.fifo, _CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                return
            budget -= len(chunk)
            self.write(chunk)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.size >= self.limit:
                self._rotate()
            piece = view[: self.limit - self.size]
            while piece:
                done = os.write(self.log, piece)
                piece = piece[done:]
                view = view[done:]
                self.size += done

    def _rotate(self) -> None:
        self.rotations += 1
        os.rename(LOG, _OLD, src_dir_fd=self.dir, dst_dir_fd=self.dir)
        os.close(self.log)
        self.log = self._open(os.O_TRUNC)
        self.size = 0
        marker = (
            f"vmenv: console log rotated ({self.rotations}x at {self.limit} bytes): the "
            f"previous part is in {_OLD}, anything older was dropped\n"
        ).encode()
        os.write(self.log, marker)
        self.size = len(marker)
