"""cgroups for guests: limits, freeze, kill and removal, on v2, v1 or a hybrid of both.

Hosts differ: pure v2 (controllers in ``cgroup.subtree_control``), pure v1 (one hierarchy per
controller) or a hybrid (v1 controllers plus a controller-less v2 tree at
``/sys/fs/cgroup/unified``). Each guest gets a group in every hierarchy that is useful: the
v2 one for ``cgroup.kill``/``cgroup.freeze`` and, where its controllers are on, limits; the
v1 ``memory``/``cpu``/``pids``/``freezer`` ones otherwise. Groups are made under the
caller's own group (``<own>/pytest-vmenv/<id>``), never elsewhere in the host's tree.

Every guest gets a pids limit (``pids.max``, :data:`DEFAULT_PIDS_MAX` unless the backend
is configured otherwise): without one, a guest's fork loop exhausts the host's pid space.
RLIMIT_NPROC is no substitute as root: it counts every process of the user on the host, and
guest root is the host's root.

A limit that cannot be applied is returned as text so the backend warns once; the guest
still runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_PIDS_MAX", "Cgroups", "GuestGroups"]

_PERIOD = 100_000
DEFAULT_PIDS_MAX = 4096
"""Processes and threads a guest may have at once: room for systemd, a web server with its
workers and a database, far below the host's ``pid_max``."""


def _mounts() -> tuple[Path | None, dict[str, Path]]:
    v2: Path | None = None
    v1: dict[str, Path] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _src, opts = ([*right.split(), "", "", ""])[:3]
            mnt = Path(left.split()[4])
            if fstype == "cgroup2" and v2 is None:
                v2 = mnt
            elif fstype == "cgroup":
                for ctrl in opts.split(","):
                    if ctrl in ("memory", "cpu", "pids", "freezer"):
                        v1.setdefault(ctrl, mnt)
    return v2, v1


def _own() -> tuple[str, dict[str, str]]:
    v2 = "/"
    v1: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _hid, ctrls, path = line.rstrip("\n").split(":", 2)
            if not ctrls:
                v2 = path
            for c in ctrls.split(","):
                v1[c] = path
    return v2, v1


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _plain(gid: str) -> bool:
    """A guest id is one path component: never empty, ``.``, ``..`` or with a ``/``."""
    return gid not in ("", ".", "..") and "/" not in gid and "\0" not in gid


@dataclass
class GuestGroups:
    """The cgroup directories of one guest (``procs`` files are what the keeper joins)."""

    v2: Path | None = None
    v1: dict[str, Path] = field(default_factory=dict)

    @property
    def dirs(self) -> list[Path]:
        return ([self.v2] if self.v2 else []) + list(self.v1.values())

    def to_json(self) -> dict[str, object]:
        """What ``meta.json`` records, for :meth:`Cgroups.adopt` in another process."""
        return {
            "v2": str(self.v2) if self.v2 else None,
            "v1": {c: str(d) for c, d in self.v1.items()},
        }

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        """Every live process of the guest, from whichever hierarchy lists them."""
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL every process in the guest's groups (cgroup.kill where available)."""
        if self.v2 and (self.v2 / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.v2 / "cgroup.kill", "1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def freeze(self, frozen: bool) -> None:
        """Freeze (or thaw) the guest and wait until the kernel says it is done."""
        if self.v2 and (self.v2 / "cgroup.freeze").exists():
            _write(self.v2 / "cgroup.freeze", "1" if frozen else "0")
            want = f"frozen {1 if frozen else 0}"
            deadline = time.monotonic() + 5
            while want not in (self.v2 / "cgroup.events").read_text().splitlines():
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, "cgroup did not freeze in time")
                time.sleep(0.001)
            return
        fz = self.v1.get("freezer")
        if fz is None:
            raise OSError(errno.ENOTSUP, "no cgroup freezer available")
        _write(fz / "freezer.state", "FROZEN" if frozen else "THAWED")
        deadline = time.monotonic() + 5
        while frozen and (fz / "freezer.state").read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "cgroup did not freeze in time")
            time.sleep(0.001)

    def remove(self, timeout: float = 2.0) -> None:
        """Kill what is left and remove the groups (retrying while exiting tasks linger).

        Groups made inside a guest's group (a systemd guest's ``init.scope``, slices and
        services) go first, deepest first: a group with children cannot be removed."""
        deadline = time.monotonic() + timeout
        nested = [p for d in self.dirs for p in _subgroups(d)]
        for d in [*nested, *self.dirs]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    self.kill()
                    time.sleep(0.0005)


def _subgroups(group: Path) -> list[Path]:
    """The groups below ``group``, deepest first (never following a symlink)."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(group))
    except OSError:
        return found
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            found += [*_subgroups(Path(entry.path)), Path(entry.path)]
    return found


class Cgroups:
    """What this host offers, probed once; makes and finds guests' groups."""

    def __init__(self) -> None:
        self.v2_mount, self.v1_mounts = _mounts()
        own_v2, own_v1 = _own()
        self.v2_parent: Path | None = None
        if self.v2_mount is not None:
            self.v2_parent = self.v2_mount / own_v2.lstrip("/") / "pytest-vmenv"
        self.v1_parents = {
            c: m / own_v1.get(c, "/").lstrip("/") / "pytest-vmenv"
            for c, m in self.v1_mounts.items()
        }
        self.v2_controllers: set[str] = set()
        self._prepared = False

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        if self.v2_parent is not None:
            try:
                self.v2_parent.mkdir(exist_ok=True)
                available = set((self.v2_parent / "cgroup.controllers").read_text().split())
                for ctrl in ("memory", "cpu", "pids"):
                    if ctrl in available:
                        try:
                            _write(self.v2_parent / "cgroup.subtree_control", f"+{ctrl}")
                        except OSError:
                            continue
                self.v2_controllers = set(
                    (self.v2_parent / "cgroup.subtree_control").read_text().split()
                )
            except OSError:
                self.v2_parent = None
        for ctrl, parent in list(self.v1_parents.items()):
            try:
                parent.mkdir(exist_ok=True)
            except OSError:
                del self.v1_parents[ctrl]

    def usable(self) -> bool:
        """True if at least one hierarchy can hold guests."""
        self._prepare()
        return self.v2_parent is not None or bool(self.v1_parents)

    def create(
        self, gid: str, memory: int | None, cpus: int | None, pids: int | None = DEFAULT_PIDS_MAX
    ) -> tuple[GuestGroups, list[str]]:
        """Make the guest's groups and apply limits (None: none); returns them and what failed."""
        if not _plain(gid):
            raise ValueError(f"invalid guest id {gid!r}")
        self._prepare()
        groups = GuestGroups()
        problems: list[str] = []
        if self.v2_parent is not None:
            d = self.v2_parent / gid
            try:
                d.mkdir()
                groups.v2 = d
            except OSError as exc:
                problems.append(f"cannot create cgroup v2 group {d}: {exc.strerror}")
        wanted = ["memory", "cpu", "pids"]
        if not (groups.v2 and (groups.v2 / "cgroup.freeze").exists()):
            wanted.append("freezer")
        for ctrl in wanted:
            if ctrl in self.v2_controllers or ctrl not in self.v1_parents:
                continue
            d = self.v1_parents[ctrl] / gid
            try:
                d.mkdir()
                groups.v1[ctrl] = d
            except OSError as exc:
                problems.append(f"cannot create cgroup v1 {ctrl} group: {exc.strerror}")
        if memory is not None:
            problems += self._limit(
                groups, "memory", str(memory), "memory.max", "memory.limit_in_bytes", str(memory)
            )
        if cpus is not None:
            problems += self._limit(
                groups,
                "cpu",
                f"{cpus * _PERIOD} {_PERIOD}",
                "cpu.max",
                "cpu.cfs_quota_us",
                str(cpus * _PERIOD),
            )
        if pids is not None:
            problems += self._limit(groups, "pids", str(pids), "pids.max", "pids.max", str(pids))
        return groups, problems

    def _limit(
        self,
        groups: GuestGroups,
        ctrl: str,
        v2_value: str,
        v2_file: str,
        v1_file: str,
        v1_value: str,
    ) -> list[str]:
        try:
            if groups.v2 is not None and ctrl in self.v2_controllers:
                _write(groups.v2 / v2_file, v2_value)
                return []
            if ctrl in groups.v1:
                if ctrl == "cpu":
                    _write(groups.v1[ctrl] / "cpu.cfs_period_us", str(_PERIOD))
                _write(groups.v1[ctrl] / v1_file, v1_value)
                return []
        except OSError as exc:
            return [f"the {ctrl} limit could not be written: {exc.strerror}"]
        return [f"no usable cgroup {ctrl} controller (neither v2 nor v1)"]

    def _ours(self, path: Path, gid: str) -> bool:
        """A recorded group dir is trusted only if it is a guest group on a cgroup mount."""
        mounts = [m for m in (self.v2_mount, *self.v1_mounts.values()) if m is not None]
        return (
            path.is_absolute()
            and ".." not in path.parts
            and path.name == gid
            and path.parent.name == "pytest-vmenv"
            and any(path.is_relative_to(m) for m in mounts)
            and path.is_dir()
        )

    def adopt(self, gid: str, recorded: dict[str, object], dirs: list[str]) -> GuestGroups:
        """The groups another process recorded for ``gid`` (checked), plus :meth:`find`'s.

        A sweeper may run in another cgroup than the guest's creator (``vmenv gc`` from a
        login shell), so the recorded paths come first; :meth:`find` adds what a guest
        half-created before its paths were recorded may have left under our own parent.
        """
        groups = self.find(gid)
        v2 = recorded.get("v2")
        if isinstance(v2, str) and self._ours(Path(v2), gid):
            groups.v2 = Path(v2)
        v1 = recorded.get("v1")
        for ctrl, d in v1.items() if isinstance(v1, dict) else ():
            if isinstance(d, str) and self._ours(Path(d), gid):
                groups.v1[str(ctrl)] = Path(d)
        if groups.v2 is None and self.v2_mount is not None:  # a meta.json from before "groups"
            v2_mount = self.v2_mount
            legacy = [Path(d) for d in dirs if Path(d).is_relative_to(v2_mount)]
            groups.v2 = next((p for p in legacy if self._ours(p, gid)), None)
        return groups

    def find(self, gid: str) -> GuestGroups:
        """The groups a guest id would have (for destroying a half-created guest)."""
        groups = GuestGroups()
        if not _plain(gid):  # ".." would name the parent, even the root cgroup: kill all
            return groups
        if self.v2_parent is not None and (self.v2_parent / gid).is_dir():
            groups.v2 = self.v2_parent / gid
        for ctrl, parent in self.v1_parents.items():
            if (parent / gid).is_dir():
                groups.v1[ctrl] = parent / gid
        return groups
