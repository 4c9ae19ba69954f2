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
import errno
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_GROUPS_MAX",
    "DEFAULT_PIDS_MAX",
    "LEAF",
    "Cgroups",
    "GuestGroups",
    "Hierarchy",
    "delegated",
    "hierarchies",
    "v2_base",
]

_PERIOD = 100_000
_PARENT = "pytest-vmenv"
LEAF = "guest"
"""The name of a guest's leaf group, below its limited group (see the module docstring)."""
DEFAULT_PIDS_MAX = 4096
"""Processes and threads a guest may have at once: room for systemd, a web server with its
workers and a database, far below the host's ``pid_max``."""
DEFAULT_GROUPS_MAX = 1024
"""Groups a guest may make below its leaf (v2 ``cgroup.max.descendants``): room for systemd's
units, and a bound on what teardown has to remove."""
CONTROLLERS = ("memory", "cpu", "pids")
"""The controllers guests' limits use."""


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy as this process sees it.

    ``name`` is ``""`` for cgroup2, else the v1 hierarchy's controllers as
    ``/proc/self/cgroup`` lists them (``"cpu,cpuacct"``, ``"name=systemd"``); ``mount`` is a
    mount of it; ``own`` is this process's group in it, relative to ``mount`` (``"/"``: the
    mount's root).
    """

    name: str
    mount: Path
    own: str = "/"

    @property
    def v2(self) -> bool:
        return self.name == ""

    def controls(self, ctrl: str) -> bool:
        return ctrl in self.name.split(",")

    @property
    def own_dir(self) -> Path:
        return self.mount / self.own.lstrip("/")


def hierarchies(
    cgroup_file: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo"
) -> list[Hierarchy]:
    """Every hierarchy this process is in that is mounted here (v2 first).

    A mount shows a hierarchy from its ``root`` (a bind mount or a mount made in another
    cgroup namespace may show a subtree): one is used only if this process's group is in it.
    """
    own: dict[str, str] = {}
    with open(cgroup_file, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            # "/.." when this process is outside its cgroup namespace's root: not usable
            if len(parts) == 3 and parts[2].startswith("/") and ".." not in parts[2].split("/"):
                own.setdefault(parts[1], parts[2])
    found: dict[str, Hierarchy] = {}
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _src, opts = ([*right.split(), "", "", ""])[:3]
            if fstype not in ("cgroup", "cgroup2") or len(fields) < 5:
                continue
            root, mnt = fields[3], Path(fields[4].replace("\\040", " "))
            options = set(opts.split(","))
            for name, path in own.items():
                is_v2 = name == ""
                if name in found or is_v2 != (fstype == "cgroup2"):
                    continue
                if not is_v2 and not set(name.split(",")) <= options:
                    continue
                if root == "/":
                    rel = path
                elif path == root or path.startswith(root.rstrip("/") + "/"):
                    rel = path[len(root.rstrip("/")) :] or "/"
                else:
                    continue
                found[name] = Hierarchy(name, mnt, rel)
    return sorted(found.values(), key=lambda h: (not h.v2, h.name))


def _listed(cgroup_file: str = "/proc/self/cgroup") -> list[str]:
    """The names of every hierarchy this process is in ("" for cgroup2)."""
    with open(cgroup_file, encoding="utf-8") as f:
        return [parts[1] for parts in (ln.split(":", 2) for ln in f) if len(parts) == 3]


def delegated(group: Path, uid: int | None = None) -> bool:
    """Whether ``group`` is delegated to ``uid`` (default: this process's effective uid):
    owned by it, and it may make groups in it and move processes through it."""
    uid = os.geteuid() if uid is None else uid
    try:
        st = os.stat(group)
    except OSError:
        return False
    return (
        st.st_uid == uid
        and os.access(group, os.W_OK | os.X_OK)
        and os.access(group / "cgroup.procs", os.W_OK)
    )


def _read_set(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def v2_base(h: Hierarchy, wanted: Iterable[str], rootless: bool) -> Path:
    """Where ``pytest-vmenv`` goes in the v2 hierarchy ``h``.

    This process's own group, unless controllers in ``wanted`` exist in ``h`` but are not
    all enabled for that group's children (a group with processes cannot enable any): then
    the nearest ancestor that enables the most of them, so guests' groups get their limits.
    Unprivileged, only delegated ancestors count (the walk stops at the first other one).
    """
    own = h.own_dir
    need = set(wanted) & _read_set(h.mount / "cgroup.controllers")
    best, score = own, len(need & _read_set(own / "cgroup.subtree_control"))
    group = own
    while score < len(need) and group != h.mount and group.is_relative_to(h.mount):
        group = group.parent
        if rootless and not delegated(group):
            break
        found = len(need & _read_set(group / "cgroup.subtree_control"))
        if found > score:
            best, score = group, found
    return best


def _label(h: Hierarchy) -> str:
    return "cgroup v2 hierarchy" if h.v2 else f"cgroup v1 {h.name} hierarchy"


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _plain(gid: str) -> bool:
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


def _walk(top: Path, visit: Callable[[int, int, str], None]) -> None:
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


def _pids_below(top: Path) -> set[int]:
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
        _walk(top, lambda _parent, fd, _name: found.update(_procs(fd)))
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
        return set() if top is None else _pids_below(top)

    def kill(self, group: Path | None = None) -> None:
        """SIGKILL every process of the guest (cgroup.kill where available, and every pid
        listed in ``group`` and below, default the guest's first group)."""
        if self.v2 and (self.v2 / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.v2 / "cgroup.kill", "1")
        for pid in self.pids(group):
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
        fz = self._v1("freezer")
        if fz is None:
            raise OSError(errno.ENOTSUP, "no cgroup freezer available")
        _write(fz / "freezer.state", "FROZEN" if frozen else "THAWED")
        deadline = time.monotonic() + 5
        while frozen and (fz / "freezer.state").read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "cgroup did not freeze in time")
            time.sleep(0.001)

    def remove(self, timeout: float = 2.0) -> None:
        """Kill what is left and remove the groups, with every group below them deepest
        first (a guest may have made some: a systemd guest's ``init.scope``, slices and
        services), retrying while exiting tasks linger."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            for group in (d / LEAF, d):
                while True:
                    try:
                        group.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                            raise
                    self.kill(group)
                    _walk(group, lambda parent, fd, name: _rmdir_at(parent, fd, name, deadline))
                    time.sleep(0.0005)


def _rmdir_at(parent: int, fd: int, name: str, deadline: float) -> None:
    """Remove the group ``name`` below ``parent`` (open as ``fd``), killing what runs in it
    until it goes or ``deadline`` passes (tasks take a moment to leave)."""
    while True:
        try:
            os.rmdir(name, dir_fd=parent)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        for pid in _procs(fd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if _children(fd):  # made meanwhile: they go first
            _walk(Path(f"/proc/self/fd/{fd}"), lambda p, f, n: _rmdir_at(p, f, n, deadline))
        time.sleep(0.0005)


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
                f"{_label(Hierarchy(name, Path('/')))}: it is not mounted here"
                for name in _listed()
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
                        f"{_label(h)}: {base} is not delegated to uid {os.geteuid()}"
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
                self.skipped.append(f"{_label(h)}: cannot create {parent}: {exc.strerror}")
                continue
            self.parents[h.name] = parent

    def _enable(self, parent: Path) -> None:
        available = _read_set(parent / "cgroup.controllers")
        for ctrl in CONTROLLERS:
            if ctrl in available:
                with contextlib.suppress(OSError):
                    _write(parent / "cgroup.subtree_control", f"+{ctrl}")
        self.v2_controllers = _read_set(parent / "cgroup.subtree_control")

    @staticmethod
    def _cpuset(parent: Path) -> None:
        """A v1 cpuset group starts with no cpus and no memory nodes (no task may join it):
        ours copies its parent's, and its children copy theirs when made."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (parent / name).read_text().strip():
                _write(parent / name, (parent.parent / name).read_text().strip())
        if (parent / "cgroup.clone_children").read_text().strip() != "1":
            _write(parent / "cgroup.clone_children", "1")

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
            if v2 is not None and ctrl in _read_set(v2.parent / "cgroup.subtree_control"):
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
        if not _plain(gid):
            raise ValueError(f"invalid guest id {gid!r}")
        self._prepare()
        groups = GuestGroups()
        problems: list[str] = []
        if not self.rootless:  # unprivileged, the user's own groups are all it may use
            problems += [f"no group of the guest's own in the {why}" for why in self.skipped]
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
                _write(groups.v2 / "cgroup.max.descendants", str(groups_max + 1))  # + the leaf
            except OSError as exc:
                problems.append(f"the cgroup count limit could not be written: {exc.strerror}")
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
            v1 = groups._v1(ctrl)
            if v1 is not None:  # a new group's cpu.cfs_period_us is already _PERIOD
                _write(v1 / v1_file, v1_value)
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
        if groups.v2 is None and v2_mount is not None:  # a meta.json from before "groups"
            legacy = [Path(d) for d in dirs if Path(d).is_relative_to(v2_mount)]
            legacy = [p.parent if p.name == LEAF else p for p in legacy]
            groups.v2 = next((p for p in legacy if self._ours(p, gid)), None)
        return groups

    def find(self, gid: str) -> GuestGroups:
        """The groups a guest id would have (for destroying a half-created guest)."""
        groups = GuestGroups()
        if not _plain(gid):  # ".." would name the parent, even the root cgroup: kill all
            return groups
        for name, parent in self._planned().items():
            if (parent / gid).is_dir():
                if name == "":
                    groups.v2 = parent / gid
                else:
                    groups.v1[name] = parent / gid
        return groups
