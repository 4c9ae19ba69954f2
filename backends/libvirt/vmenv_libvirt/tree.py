"""Write a directory tree and a cpio archive without ever following a symlink.

Why this module exists: a trial build of the tiny image copied busybox to ``bin/busybox`` after
creating ``sbin/init -> /bin/busybox``-style links, and one write went through a link and
replaced the *host's* busybox. Here every path component is opened relative to the tree's
root directory fd with ``O_NOFOLLOW``; files are created with ``O_EXCL``; links are made
with ``os.symlink(..., dir_fd=...)``. Nothing in this module resolves a path inside the tree
through the host's filesystem namespace, so a link in the tree can point anywhere: it is
never written through. :meth:`SafeTree.verify` re-checks the finished tree.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SafeTree", "cpio_newc"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SafeTree:
    """A directory tree rooted at ``root`` (which must not exist yet), written link-safely."""

    def __init__(self, root: Path) -> None:
        root.mkdir(mode=0o755)
        self.root = root
        self._fd = os.open(root, _DIR_FLAGS)

    @classmethod
    def existing(cls, root: Path) -> SafeTree:
        """The tree at ``root``, a directory that exists already (a copied image tree)."""
        tree = cls.__new__(cls)
        tree.root = root
        tree._fd = os.open(root, _DIR_FLAGS)
        return tree

    def close(self) -> None:
        os.close(self._fd)

    def _unlink(self, parent: int, name: str) -> None:
        """Remove the entry ``name`` (a file or a link, never followed) if there is one."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent)

    def replace(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        """Write the regular file ``rel``, replacing a file or link there (not a directory)."""
        parts = self._parts(rel)
        parent = self._dir_fd(parts[:-1])
        try:
            self._unlink(parent, parts[-1])
        finally:
            os.close(parent)
        self.write(rel, data, mode)

    def replace_link(self, target: str, rel: str) -> None:
        """Make ``rel`` the link ``-> target``, replacing a file or link there."""
        parts = self._parts(rel)
        parent = self._dir_fd(parts[:-1])
        try:
            self._unlink(parent, parts[-1])
            os.symlink(target, parts[-1], dir_fd=parent)
        finally:
            os.close(parent)

    def _parts(self, rel: str) -> list[str]:
        parts = [p for p in rel.strip("/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(f"bad path in tree: {rel!r}")
        return parts

    def _dir_fd(self, parts: list[str], create: bool = True) -> int:
        """An fd of the directory ``parts`` (created as real dirs, never through a link)."""
        fd = os.dup(self._fd)
        try:
            for name in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)  # ELOOP/ENOTDIR on a link
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def mkdir(self, rel: str, mode: int = 0o755) -> None:
        fd = self._dir_fd(self._parts(rel))
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def write(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        """Create the regular file ``rel`` (it must not exist) holding ``data``."""
        parts = self._parts(rel)
        parent = self._dir_fd(parts[:-1])
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(parts[-1], flags, mode, dir_fd=parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), mode)
        finally:
            os.close(parent)

    def copy(self, src: Path, rel: str, mode: int | None = None) -> None:
        """Copy the host file ``src`` (links in the *host* path are fine) to ``rel``."""
        data = src.read_bytes()
        self.write(rel, data, stat.S_IMODE(src.stat().st_mode) if mode is None else mode)

    def symlink(self, target: str, rel: str) -> None:
        """Create the link ``rel -> target`` (skipped if ``rel`` exists already)."""
        parts = self._parts(rel)
        parent = self._dir_fd(parts[:-1])
        try:
            os.symlink(target, parts[-1], dir_fd=parent)
        except FileExistsError:
            pass
        finally:
            os.close(parent)

    def walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every entry as (relative path, lstat), parents first; links are not followed."""
        stack = [""]
        while stack:
            rel = stack.pop()
            for entry in sorted(
                os.scandir(self.root / rel) if rel else os.scandir(self.root), key=lambda e: e.name
            ):
                path = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                yield path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)

    def verify(self, expected: dict[str, bytes]) -> None:
        """Check that each ``expected`` file is a regular file in the tree with that content.

        A file written through a link would be missing here (the link is still a link), so
        this catches the one mistake the module exists to prevent.
        """
        for rel, data in expected.items():
            st = os.lstat(self.root / rel)
            if not stat.S_ISREG(st.st_mode) or (self.root / rel).read_bytes() != data:
                raise RuntimeError(f"tiny image: {rel} is not the file that was written")


def _cpio_entry(
    name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0
) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def cpio_newc(entries: list[tuple[str, int, bytes | str | tuple[int, int]]]) -> bytes:
    """A ``newc`` cpio archive (what the kernel unpacks as an initramfs), built in memory.

    ``entries`` are ``(path, mode, payload)``: bytes for a regular file, a str link target
    for a symlink, a ``(major, minor)`` pair for a device node, ``b""`` for a directory.
    Built in memory so no initramfs tree is ever written to disk.
    """
    out = []
    for ino, (name, mode, payload) in enumerate(entries, start=1):
        if isinstance(payload, tuple):
            out.append(_cpio_entry(name, mode, rdev=payload, ino=ino))
        elif isinstance(payload, str):
            out.append(_cpio_entry(name, mode, payload.encode(), ino=ino))
        else:
            out.append(_cpio_entry(name, mode, payload, ino=ino))
    out.append(_cpio_entry("TRAILER!!!", 0))
    blob = b"".join(out)
    return blob + b"\0" * (-len(blob) % 512)
