"""Where guests' cgroups go (pure logic over /proc files and cgroup2 interface files).

The kernel side (leaves, limits above them, nesting, delegation) is proven with real
hierarchies in tests/emulator/test_hardening.py; this is the reading of the host's layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmenv.emulator.host import cgroups
from pytest_vmenv.emulator.host.cgroupfs import Hierarchy, hierarchies, v2_base

HYBRID_CGROUP = """\
12:name=systemd:/user.slice/session-2.scope
11:cpu,cpuacct:/user.slice
10:cpuset:/
9:memory:/user.slice/user-0.slice/session-2.scope
8:perf_event:/
7:net_cls,net_prio:/
6:misc:/
0::/user.slice/user-0.slice/session-2.scope
"""
HYBRID_MOUNTS = """\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
35 30 0:31 /user.slice /srv/memory\\040bind rw - cgroup cgroup rw,memory
36 30 0:32 /other /srv/perf rw - cgroup cgroup rw,perf_event
37 30 0:33 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio
"""


def test_every_mounted_hierarchy_is_found_with_our_group_in_it(tmp_path: Path) -> None:
    (tmp_path / "cgroup").write_text(HYBRID_CGROUP)
    (tmp_path / "mountinfo").write_text(HYBRID_MOUNTS)
    found = hierarchies(str(tmp_path / "cgroup"), str(tmp_path / "mountinfo"))
    assert [(h.name, str(h.mount), h.own) for h in found] == [
        ("", "/sys/fs/cgroup/unified", "/user.slice/user-0.slice/session-2.scope"),
        ("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct", "/user.slice"),
        ("cpuset", "/sys/fs/cgroup/cpuset", "/"),
        # a bind mount of a subtree: our group relative to what it shows
        ("memory", "/srv/memory bind", "/user-0.slice/session-2.scope"),
        ("name=systemd", "/sys/fs/cgroup/systemd", "/user.slice/session-2.scope"),
        ("net_cls,net_prio", "/sys/fs/cgroup/net_cls,net_prio", "/"),
    ]  # perf_event's mount shows another subtree, misc is not mounted: neither is usable
    assert found[1].controls("cpu") and not found[1].controls("cpuset")


def test_a_group_outside_the_namespace_root_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "cgroup").write_text("0::/../../elsewhere\n")
    (tmp_path / "mountinfo").write_text("31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert hierarchies(str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")) == []


def _tree(root: Path, groups: dict[str, tuple[str, str]]) -> None:
    """cgroup2 interface files: group -> (cgroup.controllers, cgroup.subtree_control)."""
    for rel, (controllers, enabled) in groups.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.controllers").write_text(controllers + "\n")
        (d / "cgroup.subtree_control").write_text(enabled + "\n")


def test_v2_groups_go_below_the_nearest_group_that_enables_the_controllers(
    tmp_path: Path,
) -> None:
    """pytest's own group has processes, so it cannot enable controllers for children."""
    _tree(
        tmp_path,
        {
            "": ("cpu io memory pids", "cpu io memory pids"),
            "user.slice": ("cpu io memory pids", "memory pids"),
            "user.slice/ci.service": ("memory pids", ""),
        },
    )
    h = Hierarchy("", tmp_path, "/user.slice/ci.service")
    assert v2_base(h, ("memory", "pids"), rootless=False) == tmp_path / "user.slice"
    assert v2_base(h, ("memory", "cpu", "pids"), rootless=False) == tmp_path  # cpu: only there
    assert v2_base(h, ("hugetlb",), rootless=False) == h.own_dir  # nothing to enable: our own


def test_v2_groups_stay_in_our_group_when_no_ancestor_has_the_controllers(
    tmp_path: Path,
) -> None:
    _tree(tmp_path, {"": ("memory pids", ""), "a": ("", ""), "a/b": ("", "")})
    h = Hierarchy("", tmp_path, "/a/b")
    assert v2_base(h, ("memory", "cpu", "pids"), rootless=False) == tmp_path / "a" / "b"


def test_a_hierarchy_the_guest_gets_no_group_in_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed in /proc/self/cgroup but not mounted here: the guest's cgroup namespace there
    is pytest's group, which the backend warns about (as root)."""
    monkeypatch.setattr(cgroups, "hierarchies", lambda: [Hierarchy("", tmp_path, "/")])
    monkeypatch.setattr(cgroups, "listed", lambda: ["", "misc", "name=systemd"])
    groups, problems = cgroups.Cgroups(rootless=False).create("g1", None, None, None)
    assert groups.leaves == [tmp_path / "pytest-vmenv" / "g1" / "guest"]
    assert problems == [
        "no group of the guest's own in the cgroup v1 misc hierarchy: it is not mounted here",
        "no group of the guest's own in the cgroup v1 name=systemd hierarchy: it is not "
        "mounted here",
    ]
    unprivileged = cgroups.Cgroups(rootless=True)
    assert unprivileged.create("g2", None, None, None)[1] == []  # only delegated ones count
