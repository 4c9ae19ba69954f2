"""Build a guest's root inside its own mount namespace, then pivot into it (runs as PID 1).

Everything here runs in the guest's PID 1, after ``unshare`` and before it serves commands,
so every mount lands in the guest's private mount namespace and vanishes with it: nothing is
ever mounted in the host's namespace. The layout follows Docker's defaults: a fresh ``/proc``
with ``/proc/sys`` read-only and the sensitive files masked, a read-only ``/sys``, a tiny
``/dev`` tmpfs with only the harmless character devices (no block device, and ``mknod``
is impossible once CAP_MKNOD is dropped), and Docker's default capability set minus
CAP_MKNOD.

Paths inside the new root are never followed through a symlink before ``pivot_root``: an
image could point ``/proc`` at a host path, so each mount point must be a real directory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any

from .. import syscalls
from . import seccomp

__all__ = ["AGENT_PID", "DOCKER_CAPS", "HOST_BASE", "build_root"]

AGENT_PID = 2
"""A systemd guest's agent: PID 1's first child (see :mod:`.pid1`), protected by the filter."""

HOST_BASE = "@host"
"""Stack entry meaning "a read-only view of the host's /" (mounted per guest)."""

# Docker's default capability set, without CAP_MKNOD (27): CHOWN 0, DAC_OVERRIDE 1, FOWNER 3,
# FSETID 4, KILL 5, SETGID 6, SETUID 7, SETPCAP 8, NET_BIND_SERVICE 10, NET_RAW 13,
# SYS_CHROOT 18, AUDIT_WRITE 29, SETFCAP 31.
DOCKER_CAPS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 29, 31})
CAP_SYS_RESOURCE = 24

_DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
_MASKED_FILES = (
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "sysrq-trigger",
)
_MASKED_DIRS = (
    "proc/acpi",
    "proc/asound",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
)
_READONLY = ("proc/sys", "proc/bus", "proc/fs", "proc/irq")
_NOSUID_NODEV_NOEXEC = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
_RO_NODEV = syscalls.MS_RDONLY | syscalls.MS_NODEV


def _real_dir(path: str) -> None:
    """Make ``path`` exist as a directory, refusing a symlink in its place."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path!r} in the image is not a directory (a symlink?); cannot mount on it")


def _mount_stack(cfg: Mapping[str, Any], root: str) -> None:
    gdir = cfg["gdir"]
    lowers: list[str] = []
    for entry in cfg["stack"]:
        if entry == HOST_BASE:
            # overlay refuses lowerdir=/ alone and layers nested in it (ELOOP); a read-only
            # overlay of / plus an empty tmpfs is a distinct filesystem to stack over.
            syscalls.mount("tmpfs", f"{gdir}/empty", "tmpfs", _RO_NODEV, "size=4k,mode=755")
            syscalls.mount(
                "overlay", f"{gdir}/base", "overlay", _RO_NODEV, f"lowerdir=/:{gdir}/empty"
            )
            lowers.append(f"{gdir}/base")
        else:
            lowers.append(entry)
    os.chdir(cfg["layers_root"])  # relative lowerdirs keep the option string short
    upper, work = cfg.get("upper", f"{gdir}/upper"), cfg.get("work", f"{gdir}/work")
    options = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},index=off"
    if cfg.get("userns") is not None:  # user.overlay.* xattrs: trusted.* needs real root
        options += ",userxattr"
    # nodev: device nodes in a layer (or in the host's / outside /dev) cannot be opened;
    # overlay's own whiteouts (0/0 char devices in the upper dir) are unaffected. Not
    # nosuid: sudo and friends must work in the guest.
    syscalls.mount("overlay", root, "overlay", syscalls.MS_NODEV, options)


def _mount_dev(root: str, console: str, userns: bool) -> None:
    dev = f"{root}/dev"
    _real_dir(dev)
    syscalls.mount(
        "tmpfs", dev, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NOEXEC, "mode=755,size=65536k"
    )
    for name, (major, minor) in _DEVICES.items():
        if userns:  # no mknod in a user namespace: bind the host's node (still the host's /)
            with open(f"{dev}/{name}", "wb"):
                pass
            syscalls.mount(f"/dev/{name}", f"{dev}/{name}", None, syscalls.MS_BIND)
            continue
        os.mknod(f"{dev}/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)
    os.mkdir(f"{dev}/pts", 0o755)
    syscalls.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.mkdir(f"{dev}/shm", 0o1777)
    syscalls.mount("shm", f"{dev}/shm", "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=65536k")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{dev}/{name}")
    os.symlink("/proc/self/fd", f"{dev}/fd")
    os.symlink("/proc/kcore", f"{dev}/core")
    with open(f"{dev}/console", "wb"):
        pass
    syscalls.mount(console, f"{dev}/console", None, syscalls.MS_BIND)


def _mount_proc_sys(root: str, userns: bool) -> None:
    _real_dir(f"{root}/proc")
    syscalls.mount("proc", f"{root}/proc", "proc", _NOSUID_NODEV_NOEXEC)
    _real_dir(f"{root}/sys")
    try:
        syscalls.mount("sysfs", f"{root}/sys", "sysfs", _NOSUID_NODEV_NOEXEC | syscalls.MS_RDONLY)
    except OSError as exc:
        if not userns:
            raise
        # never the host's /sys: an empty read-only /sys is the safe fallback
        os.write(1, f"vmenv: sysfs refused in the user namespace ({exc}); /sys empty\n".encode())
        syscalls.mount(
            "tmpfs", f"{root}/sys", "tmpfs", _NOSUID_NODEV_NOEXEC | syscalls.MS_RDONLY, "size=0"
        )
    for rel in _READONLY:
        path = f"{root}/{rel}"
        if os.path.isdir(path):
            syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC)
            syscalls.mount(
                path,
                path,
                None,
                syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | _NOSUID_NODEV_NOEXEC,
            )
    for name in _MASKED_FILES:
        path = f"{root}/proc/{name}"
        if os.path.exists(path):
            syscalls.mount(f"{root}/dev/null", path, None, syscalls.MS_BIND)
    for rel in _MASKED_DIRS:
        path = f"{root}/{rel}"
        if os.path.isdir(path):
            syscalls.mount("tmpfs", path, "tmpfs", syscalls.MS_RDONLY, "size=0")


def _mount_systemd(root: str) -> None:
    """What systemd as PID 1 needs of its container (systemd.io/CONTAINER_INTERFACE): ``/run``
    and ``/run/lock`` as tmpfs, the guest's own cgroup v2 subtree writable at
    ``/sys/fs/cgroup`` (the cgroup namespace's root: nothing above it is visible), and
    ``console-getty.service`` masked (``/dev/console`` is a log file, not a terminal)."""
    _real_dir(f"{root}/run")
    syscalls.mount(
        "tmpfs", f"{root}/run", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=755,size=10%"
    )
    os.mkdir(f"{root}/run/lock", 0o1777)
    syscalls.mount(
        "tmpfs", f"{root}/run/lock", "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=5242880"
    )
    os.makedirs(f"{root}/run/systemd/system", 0o755)
    os.symlink("/dev/null", f"{root}/run/systemd/system/console-getty.service")
    syscalls.mount("cgroup2", f"{root}/sys/fs/cgroup", "cgroup2", _NOSUID_NODEV_NOEXEC)


def build_root(cfg: Mapping[str, Any]) -> None:
    """Mount the guest's root from ``cfg`` and make it ``/`` (then drop capabilities).

    ``cfg`` keys: ``gdir`` (guest dir with ``upper``, ``work``, ``root``, ``base``,
    ``empty``), ``upper``/``work`` (the overlay's, default in ``gdir``), ``stack`` (lower
    layers, top first; :data:`HOST_BASE` for the host's /),
    ``layers_root`` (directory relative stack entries are resolved from), ``hostname``,
    ``console`` (file bound on ``/dev/console``), ``userns`` (``[uid, gid]`` when PID 1 is in
    the unprivileged mode's user namespace, see :mod:`.userns`; absent as root), ``oom``
    (see :mod:`.oom`: when ``shielded``, PID 1 keeps CAP_SYS_RESOURCE for itself, outside
    the bounding set, to move its ``oom_score_adj`` around each spawn), ``init``
    (``"systemd"``: also the mounts systemd needs, see :func:`_mount_systemd`, and the
    filter's protection of its agent, see :mod:`.seccomp`).
    """
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    root = f"{cfg['gdir']}/root"
    _mount_stack(cfg, root)
    userns = cfg.get("userns") is not None
    _mount_dev(root, cfg["console"], userns)
    _mount_proc_sys(root, userns)
    if cfg.get("init") == "systemd":
        _mount_systemd(root)
    for rel in ("tmp", "run"):
        path = f"{root}/{rel}"
        if not os.path.lexists(path):
            os.mkdir(path, 0o1777 if rel == "tmp" else 0o755)
    syscalls.sethostname(cfg["hostname"])
    syscalls.link_up("lo")
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")
    agent = AGENT_PID if cfg.get("init") == "systemd" else None
    seccomp.install(agent)  # while CAP_SYS_ADMIN is still held: no no_new_privs, so sudo works
    shielded = bool((cfg.get("oom") or {}).get("shielded"))
    syscalls.drop_capabilities(DOCKER_CAPS, frozenset({CAP_SYS_RESOURCE} if shielded else ()))
