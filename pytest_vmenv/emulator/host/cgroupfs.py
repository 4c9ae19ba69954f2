"""The cgroup hierarchies this process is in, as mounted here, and where guests' groups go.

Hosts differ: pure v2, pure v1 or a hybrid of both (see :mod:`.cgroups`). :func:`hierarchies`
reads ``/proc/self/cgroup`` and ``mountinfo``; :func:`v2_base` picks the v2 group under which
guests get their controllers; :func:`delegated` tells a group the unprivileged mode may use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Hierarchy", "delegated", "hierarchies", "label", "listed", "read_set", "v2_base"]


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


def listed(cgroup_file: str = "/proc/self/cgroup") -> list[str]:
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


def read_set(path: Path) -> set[str]:
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
    need = set(wanted) & read_set(h.mount / "cgroup.controllers")
    best, score = own, len(need & read_set(own / "cgroup.subtree_control"))
    group = own
    while score < len(need) and group != h.mount and group.is_relative_to(h.mount):
        group = group.parent
        if rootless and not delegated(group):
            break
        found = len(need & read_set(group / "cgroup.subtree_control"))
        if found > score:
            best, score = group, found
    return best


def label(h: Hierarchy) -> str:
    return "cgroup v2 hierarchy" if h.v2 else f"cgroup v1 {h.name} hierarchy"
