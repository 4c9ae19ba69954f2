"""One guest's cgroups: its processes, and killing, freezing and removing them.

A guest has a group in every hierarchy (see :mod:`.cgroups`), with its :data:`LEAF` below
where its processes run. Groups are walked through directory descriptors, never by path
(:func:`walk`): what a guest nests below its root may be deeper than ``PATH_MAX``. Teardown
removes what a guest made below its leaf too, deepest first (:meth:`GuestGroups.remove`),
so a guest cannot make itself undeletable with a child group.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...poll import poll_until

__all__ = ["LEAF", "GuestGroups", "write"]

LEAF = "guest"
"""The name of a guest's leaf group, below its limited group (see :mod:`.cgroups`)."""
_REMOVE_PAUSE = 0.0005  # tasks take a moment to leave a killed group


def write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def plain(gid: str) -> bool:
    """A guest id is one path component: never empty, ``.``, ``..`` or with a ``/``."""
    return gid not in ("", ".", "..") and "/" not in gid and "\0" not in gid


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _children(fd: int) -> list[str]:
    """The groups right below the group open as ``fd`` (cgroupfs has no symlinks)."""
    with os.scandir(fd) as it:
        return [e.name for e in it if e.is_dir(follow_symlinks=False)]


def _procs(fd: int) -> set[int]:
    """The processes of the group open as ``fd``."""
    try:
        pfd = os.open("cgroup.procs", os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return set()
    with os.fdopen(pfd) as f:
        return {int(x) for x in f.read().split() if x.isdigit()}


def walk(top: Path, visit: Callable[[int, int, str], None]) -> None:
    """Call ``visit(parent_fd, fd, name)`` for every group below ``top``, deepest first.

    Through directory descriptors, never a path: what a guest nests below its root may be
    deeper than ``PATH_MAX``. A group that vanished meanwhile is skipped.
    """
    try:
        top_fd = os.open(top, _DIR)
    except OSError:
        return
    stack: list[tuple[int, str, list[str]]] = [(top_fd, "", [])]
    try:
        stack[0][2].extend(_children(top_fd))
        while stack:
            fd, name, pending = stack[-1]
            if pending:
                child = pending.pop()
                try:
                    cfd = os.open(child, _DIR, dir_fd=fd)
                except OSError:
                    continue
                stack.append((cfd, child, []))
                stack[-1][2].extend(_children(cfd))
                continue
            stack.pop()
            if stack:
                try:
                    visit(stack[-1][0], fd, name)
                finally:
                    os.close(fd)
    finally:
        for fd, _name, _pending in stack:
            os.close(fd)
        if not stack:
            os.close(top_fd)


def pids_below(top: Path) -> set[int]:
    """The processes in ``top`` and every group below it. On v2, when ``cgroup.stat`` says
    there is nothing below but the leaf, only the two are read."""
    found: set[int] = set()
    try:
        stat = dict(ln.split() for ln in (top / "cgroup.stat").read_text().splitlines())
    except (OSError, ValueError):
        stat = {}
    groups = [top, top / LEAF] if stat.get("nr_descendants") == "1" else [top]
    for group in groups:
        with contextlib.suppress(OSError, ValueError):
            found.update(int(x) for x in (group / "cgroup.procs").read_text().split())
    if len(groups) == 1 and stat.get("nr_descendants") != "0":
        walk(top, lambda _parent, fd, _name: found.update(_procs(fd)))
    return found


@dataclass
class GuestGroups:
    """The cgroup directories of one guest: ``v2`` and ``v1`` (by hierarchy name) are its
    limited groups; the keeper joins the :data:`LEAF` below each (``procs_files``)."""

    v2: Path | None = None
    v1: dict[str, Path] = field(default_factory=dict)

    @property
    def dirs(self) -> list[Path]:
        return ([self.v2] if self.v2 else []) + list(self.v1.values())

    @property
    def leaves(self) -> list[Path]:
        """The guest's leaf groups, where its processes are (``meta.json``'s ``cgroups``)."""
        return [d / LEAF for d in self.dirs]

    def to_json(self) -> dict[str, object]:
        """What ``meta.json`` records, for :meth:`Cgroups.adopt` in another process."""
        return {
            "v2": str(self.v2) if self.v2 else None,
            "v1": {c: str(d) for c, d in self.v1.items()},
        }

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.leaves]

    def _v1(self, ctrl: str) -> Path | None:
        return next((d for name, d in self.v1.items() if ctrl in name.split(",")), None)

    @property
    def can_freeze(self) -> bool:
        """Whether these groups have a freezer (v2's ``cgroup.freeze`` or v1's freezer)."""
        v2 = self.v2 is not None and (self.v2 / "cgroup.freeze").exists()
        return v2 or self._v1("freezer") is not None

    def pids(self, group: Path | None = None) -> set[int]:
        """Every live process in ``group`` and below (default: the guest's first group).

        One hierarchy is enough: the keeper joined every leaf before it started anything,
        and no process inside a cgroup namespace can leave the subtree of its root.
        """
        top = group if group is not None else next(iter(self.dirs), None)
        return set() if top is None else pids_below(top)

    def kill(self, group: Path | None = None) -> None:
        """SIGKILL every process of the guest (cgroup.kill where available, and every pid
        listed in ``group`` and below, default the guest's first group)."""
        if self.v2 and (self.v2 / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                write(self.v2 / "cgroup.kill", "1")
        for pid in self.pids(group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def freeze(self, frozen: bool) -> None:
        """Freeze (or thaw) the guest and wait until the kernel says it is done."""
        if self.v2 and (self.v2 / "cgroup.freeze").exists():
            events = self.v2 / "cgroup.events"
            write(self.v2 / "cgroup.freeze", "1" if frozen else "0")
            want = f"frozen {1 if frozen else 0}"
            _settle(lambda: want in events.read_text().splitlines())
            return
        fz = self._v1("freezer")
        if fz is None:
            raise OSError(errno.ENOTSUP, "no cgroup freezer available")
        write(fz / "freezer.state", "FROZEN" if frozen else "THAWED")
        if frozen:
            _settle(lambda: (fz / "freezer.state").read_text().strip() == "FROZEN")

    def remove(self, timeout: float = 2.0) -> None:
        """Kill what is left and remove the groups, with every group below them deepest
        first (a guest may have made some: a systemd guest's ``init.scope``, slices and
        services), retrying while exiting tasks linger, until ``timeout``."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            for group in (d / LEAF, d):

                def clear(group: Path = group) -> None:
                    self.kill(group)
                    walk(group, lambda parent, fd, name: _rmdir_at(parent, fd, name, deadline))

                _remove(group.rmdir, clear, deadline)


def _settle(done: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until the freezer reports the state asked for."""

    def probe(last_try: bool) -> bool | None:
        if done():
            return True
        if last_try:
            raise OSError(errno.ETIMEDOUT, "cgroup did not freeze in time")
        return None

    poll_until(probe, timeout=5.0, what="the cgroup freezer", interval=0.001, max_interval=0.01)


def _removed(rmdir: Callable[[], None], *, busy_ok: bool = True) -> bool:
    """``rmdir()``: True when the group is gone, False while it is busy (EBUSY: tasks in it;
    raised instead unless ``busy_ok``)."""
    try:
        rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.EBUSY or not busy_ok:
            raise
        return False
    return True


def _remove(rmdir: Callable[[], None], clear: Callable[[], None], deadline: float) -> None:
    """Remove a group, ``clear()``-ing it (kill its tasks, remove its children) while it is
    busy, until ``deadline``; then the EBUSY is raised. A group that goes at once (the usual
    case at destroy) costs one ``rmdir``."""
    if _removed(rmdir):
        return
    clear()

    def probe(last_try: bool) -> bool | None:
        if _removed(rmdir, busy_ok=not last_try):
            return True
        clear()
        return None

    poll_until(
        probe,
        timeout=max(0.0, deadline - time.monotonic()),
        what="a cgroup's removal",
        interval=_REMOVE_PAUSE,
        max_interval=_REMOVE_PAUSE,
    )


def _rmdir_at(parent: int, fd: int, name: str, deadline: float) -> None:
    """Remove the group ``name`` below ``parent`` (open as ``fd``), killing what runs in it
    until it goes or ``deadline`` passes (tasks take a moment to leave)."""

    def clear() -> None:
        for pid in _procs(fd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if _children(fd):  # made meanwhile: they go first
            walk(Path(f"/proc/self/fd/{fd}"), lambda p, f, n: _rmdir_at(p, f, n, deadline))

    _remove(lambda: os.rmdir(name, dir_fd=parent), clear, deadline)
