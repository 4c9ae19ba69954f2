"""cgroups for guests: a group of its own in every hierarchy, limits one level above it.

Hosts differ: pure v2 (one hierarchy, controllers in ``cgroup.subtree_control``), pure v1 (a
hierarchy per controller, plus named ones such as ``name=systemd``) or a hybrid of both (v1
controllers plus a controller-less v2 tree at ``/sys/fs/cgroup/unified``). In *every*
hierarchy this process is in (``/proc/self/cgroup``) and that is mounted here, a guest gets::

    <base>/pytest-vmenv/<id>          its group: limits, freeze, kill and removal act here
    <base>/pytest-vmenv/<id>/guest    its leaf (:data:`LEAF`): the keeper, PID 1 and every
                                      command run here; the root of the guest's cgroup namespace

The keeper joins the leaves before it unshares the cgroup namespace, so in every hierarchy
the guest's ``/`` is its own leaf, never the host's root group nor pytest's: nothing of the
host's tree (another process's cpuset or freezer group, libvirt's QEMU guests, the root's
``cgroup.procs``) can be named from inside, whatever cgroupfs the guest mounts. The limits
(``memory.max``/``memory.limit_in_bytes``, ``cpu.max``/``cpu.cfs_quota_us``, ``pids.max``,
and on v2 ``cgroup.max.descendants``) are written on ``<id>``, one level *above* that root:
the leaf's own limit files, which a guest with a cgroupfs mount can write, bound nothing more
than ``<id>`` does (every limit is hierarchical). That is what the ``nsdelegate`` mount option
gives on v2 (the guest writes only inside its own subtree) without needing it: only the
host's own cgroup2 mount can set it. No controller is enabled below ``<id>`` on v2: the
leaf has no controller files, and an init in the guest (systemd) runs without them.

``<base>`` is this process's own group, except in a v2 hierarchy with domain controllers to
use: a group with processes in it (pytest's) cannot enable controllers for its children, so
``<base>`` is the nearest ancestor that has them enabled (:func:`v2_base`).

Unprivileged, only *delegated* groups are used: a group owned by this user whose
``cgroup.procs`` it may write (systemd's ``Delegate=yes`` units, a user manager's
``user@UID.service`` tree, or a group an administrator chowned); see :func:`delegated`.
Elsewhere the unprivileged mode runs without cgroups (and with ``RLIMIT_NPROC``, see
:mod:`.userns`).

Every guest gets a pids limit (``pids.max``, :data:`DEFAULT_PIDS_MAX` unless the backend
is configured otherwise): without one, a guest's fork loop exhausts the host's pid space.
RLIMIT_NPROC is no substitute as root: it counts every process of the user on the host, and
guest root is the host's root.

Teardown removes what a guest made below its leaf too, deepest first (:meth:`GuestGroups.remove`),
so a guest cannot make itself undeletable with a child group.

A limit or group that cannot be made is returned as text so the backend warns once; the
guest still runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from .cgroupfs import Hierarchy, delegated, hierarchies, label, listed, read_set, v2_base
from .guestgroups import LEAF, GuestGroups, plain, write

__all__ = [
    "CONTROLLERS",
    "DEFAULT_GROUPS_MAX",
    "DEFAULT_PIDS_MAX",
    "LEAF",
    "Cgroups",
    "GuestGroups",
    "Hierarchy",
]

_PERIOD = 100_000
_PARENT = "pytest-vmenv"
DEFAULT_PIDS_MAX = 4096
"""Processes and threads a guest may have at once: room for systemd, a web server with its
workers and a database, far below the host's ``pid_max``."""
DEFAULT_GROUPS_MAX = 1024
"""Groups a guest may make below its leaf (v2 ``cgroup.max.descendants``): room for systemd's
units, and a bound on what teardown has to remove."""
CONTROLLERS = ("memory", "cpu", "pids")
"""The controllers guests' limits use."""


class Cgroups:
    """What this host offers, probed once; makes and finds guests' groups.

    ``found`` defaults to :func:`hierarchies` (tests pass a hierarchy of their own, e.g. a
    private cgroup2 mount); ``rootless`` (default: not running as root) restricts the
    groups used to delegated ones.
    """

    def __init__(
        self, found: Sequence[Hierarchy] | None = None, *, rootless: bool | None = None
    ) -> None:
        self.hierarchies = list(hierarchies() if found is None else found)
        self.rootless = os.geteuid() != 0 if rootless is None else rootless
        self.parents: dict[str, Path] = {}  # hierarchy name -> its pytest-vmenv group
        self.v2_controllers: set[str] = set()
        self.skipped: list[str] = []  # hierarchies the guest cannot have a group in, and why
        if found is None:  # listed in /proc/self/cgroup, but not mounted here
            mounted = {h.name for h in self.hierarchies}
            self.skipped += [
                f"{label(Hierarchy(name, Path('/')))}: it is not mounted here"
                for name in listed()
                if name not in mounted
            ]
        self._prepared = False
        self._plan: dict[str, Path] | None = None

    @property
    def v2_mount(self) -> Path | None:
        return next((h.mount for h in self.hierarchies if h.v2), None)

    @property
    def v2_parent(self) -> Path | None:
        self._prepare()
        return self.parents.get("")

    def _planned(self) -> dict[str, Path]:
        """Hierarchy name -> where its ``pytest-vmenv`` group is (made or not); the reasons
        the others are left out go to ``skipped``. Reads only, never creates."""
        if self._plan is None:
            self._plan = {}
            for h in self.hierarchies:
                base = v2_base(h, CONTROLLERS, self.rootless) if h.v2 else h.own_dir
                if self.rootless and not delegated(base):
                    self.skipped.append(
                        f"{label(h)}: {base} is not delegated to uid {os.geteuid()}"
                    )
                    continue
                self._plan[h.name] = base / _PARENT
        return self._plan

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        for h in self.hierarchies:
            parent = self._planned().get(h.name)
            if parent is None:
                continue
            try:
                parent.mkdir(exist_ok=True)
                if h.v2:
                    self._enable(parent)
                elif h.controls("cpuset"):
                    self._cpuset(parent)
            except OSError as exc:
                self.skipped.append(f"{label(h)}: cannot create {parent}: {exc.strerror}")
                continue
            self.parents[h.name] = parent

    def _enable(self, parent: Path) -> None:
        available = read_set(parent / "cgroup.controllers")
        for ctrl in CONTROLLERS:
            if ctrl in available:
                with contextlib.suppress(OSError):
                    write(parent / "cgroup.subtree_control", f"+{ctrl}")
        self.v2_controllers = read_set(parent / "cgroup.subtree_control")

    @staticmethod
    def _cpuset(parent: Path) -> None:
        """A v1 cpuset group starts with no cpus and no memory nodes (no task may join it):
        ours copies its parent's, and its children copy theirs when made."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (parent / name).read_text().strip():
                write(parent / name, (parent.parent / name).read_text().strip())
        if (parent / "cgroup.clone_children").read_text().strip() != "1":
            write(parent / "cgroup.clone_children", "1")

    def usable(self) -> bool:
        """True if at least one hierarchy can hold guests."""
        self._prepare()
        return bool(self.parents)

    def offers(self, ctrl: str) -> bool:
        """Whether guests' groups get the ``ctrl`` controller (for their limits); before any
        guest was made, as far as can be told without creating anything."""
        if self._prepared:
            found = set(self.parents)
            if ctrl in self.v2_controllers:
                return True
        else:
            found = set(self._planned())
            v2 = self._planned().get("")
            if v2 is not None and ctrl in read_set(v2.parent / "cgroup.subtree_control"):
                return True
        return any(h.controls(ctrl) and h.name in found for h in self.hierarchies if not h.v2)

    def create(
        self,
        gid: str,
        memory: int | None,
        cpus: int | None,
        pids: int | None = DEFAULT_PIDS_MAX,
        groups_max: int | None = DEFAULT_GROUPS_MAX,
    ) -> tuple[GuestGroups, list[str]]:
        """Make the guest's groups and apply limits (None: none); returns them and what failed."""
        if not plain(gid):
            raise ValueError(f"invalid guest id {gid!r}")
        self._prepare()
        problems: list[str] = []
        if not self.rootless:  # unprivileged, the user's own groups are all it may use
            problems += [f"no group of the guest's own in the {why}" for why in self.skipped]
        groups = self._make(gid, problems)
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
        if groups_max is not None and groups.v2 is not None:
            try:
                write(groups.v2 / "cgroup.max.descendants", str(groups_max + 1))  # + the leaf
            except OSError as exc:
                problems.append(f"the cgroup count limit could not be written: {exc.strerror}")
        return groups, problems

    def _make(self, gid: str, problems: list[str]) -> GuestGroups:
        """The guest's group and leaf in every hierarchy that can hold them."""
        groups = GuestGroups()
        for h in self.hierarchies:
            parent = self.parents.get(h.name)
            if parent is None:
                continue
            d = parent / gid
            try:
                d.mkdir()
            except OSError as exc:
                problems.append(f"cannot create cgroup group {d}: {exc.strerror}")
                continue
            try:
                (d / LEAF).mkdir()
            except OSError as exc:
                problems.append(f"cannot create cgroup group {d / LEAF}: {exc.strerror}")
                with contextlib.suppress(OSError):
                    d.rmdir()
                continue
            if h.v2:
                groups.v2 = d
            else:
                groups.v1[h.name] = d
        return groups

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
                write(groups.v2 / v2_file, v2_value)
                return []
            v1 = groups._v1(ctrl)
            if v1 is not None:  # a new group's cpu.cfs_period_us is already _PERIOD
                write(v1 / v1_file, v1_value)
                return []
        except OSError as exc:
            return [f"the {ctrl} limit could not be written: {exc.strerror}"]
        return [f"no usable cgroup {ctrl} controller (neither v2 nor v1)"]

    def _ours(self, path: Path, gid: str) -> bool:
        """A recorded group dir is trusted only if it is a guest group on a cgroup mount."""
        return (
            path.is_absolute()
            and ".." not in path.parts
            and path.name == gid
            and path.parent.name == _PARENT
            and any(path.is_relative_to(h.mount) for h in self.hierarchies)
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
        for name, d in v1.items() if isinstance(v1, dict) else ():
            if isinstance(d, str) and self._ours(Path(d), gid):
                groups.v1[str(name)] = Path(d)
        v2_mount = self.v2_mount
        if groups.v2 is None and v2_mount is not None:  # a meta.json with leaf paths only
            leaves = [Path(d) for d in dirs if Path(d).is_relative_to(v2_mount)]
            leaves = [p.parent if p.name == LEAF else p for p in leaves]
            groups.v2 = next((p for p in leaves if self._ours(p, gid)), None)
        return groups

    def find(self, gid: str) -> GuestGroups:
        """The groups a guest id would have (for destroying a half-created guest)."""
        groups = GuestGroups()
        if not plain(gid):  # ".." would name the parent, even the root cgroup: kill all
            return groups
        for name, parent in self._planned().items():
            if (parent / gid).is_dir():
                if name == "":
                    groups.v2 = parent / gid
                else:
                    groups.v1[name] = parent / gid
        return groups
