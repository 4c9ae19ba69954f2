"""What the emulator can make on this host, and the warnings about what it cannot apply.

:func:`check` says whether the backend can run at all; :func:`unavailable_for` why one spec
cannot be made here (root makes every spec but a few; unprivileged, see :mod:`.userns`,
refuses more). A limit that cannot be enforced is not a refusal: the guest runs without it
and :class:`LimitNotApplied` is warned once per process and problem.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ... import errors
from ...backend import Capabilities
from ...images import ImageCache, builder_problem, recipe_of, subids
from ..guest import seccomp
from . import disk, userns
from .images import is_host
from .state import NAME, State

if TYPE_CHECKING:
    from ...spec import MachineSpec

__all__ = [
    "LimitNotApplied",
    "capabilities",
    "check",
    "init_of",
    "refuse",
    "restrictions",
    "unavailable_for",
    "warn_limits",
    "warn_unfiltered",
]

SUBIDS_PURPOSE = "an unprivileged emulator machine on a Debian image (a full uid/gid map)"
SYSTEMD_REASON = (
    "init='systemd' unprivileged needs a cgroup v2 subtree delegated to uid {uid} (pytest's "
    "own v2 group, owned by it and writable, as systemd's user@.service or `systemd-run "
    "--user --scope -p Delegate=yes pytest` gives; {why}); use init='none', or run as root"
)
_WARNED: set[str] = set()


class LimitNotApplied(UserWarning):
    """A ``memory``/``cpus`` limit could not be enforced on this host (the guest still runs)."""


def capabilities(network_available: bool) -> Capabilities:
    root = sys.platform.startswith("linux") and not userns.rootless()
    return Capabilities(
        live_snapshot=False, network=network_available, limits=root, console_log=True
    )


def check() -> None:
    def no(reason: str) -> errors.BackendUnavailable:
        return errors.BackendUnavailable(NAME, reason)

    if not sys.platform.startswith("linux"):
        raise no(f"it needs Linux namespaces; this is {sys.platform}")
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            if "overlay" not in f.read():
                raise no("the kernel has no overlayfs (try `modprobe overlay`)")
    except OSError as exc:
        raise no(f"cannot read /proc/filesystems: {exc}") from exc
    for ns in ("mnt", "pid", "net", "uts", "ipc", "cgroup"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            raise no(f"the kernel lacks {ns} namespaces")
    if userns.rootless():
        userns.check()  # can this user make a user namespace with an overlay in it?


def _unprivileged_reasons(state: State, spec: MachineSpec, init: str) -> list[str]:
    reasons = []
    if is_host(spec.image, spec.image_config):
        reasons.append(userns.HOST_REASON)
    if recipe_of(spec) is not None:
        problem = subids.problem(SUBIDS_PURPOSE)
        reasons += [problem] if problem is not None else _image_reasons(state, spec)
    if init == "systemd" and state.cgroups.v2_parent is None:
        skipped = [s for s in state.cgroups.skipped if s.startswith("cgroup v2")]
        why = skipped[0] if skipped else "this process is in no cgroup v2 hierarchy"
        reasons.append(SYSTEMD_REASON.format(uid=os.geteuid(), why=why))
    return reasons


def _image_reasons(state: State, spec: MachineSpec) -> list[str]:
    """A Debian image's: not built and no builder, or built for another kind of guest."""
    recipe = recipe_of(spec)
    if recipe is None:
        return []
    try:
        built = ImageCache(state.state_dir).lookup(recipe)
    except errors.ConfigError as exc:
        return [str(exc)]
    problem = builder_problem() if built is None else subids.id_problem(built)
    return [] if problem is None else [problem]


def _root_reasons(state: State, spec: MachineSpec, init: str) -> list[str]:
    reasons = []
    if spec.disk is not None:
        if spec.disk < disk.MIN_SIZE:
            reasons.append(f"disk={spec.disk} is too small: the emulator's smallest disk is 1M")
        elif (problem := disk.unavailable()) is not None:
            reasons.append(problem)
    reasons += _image_reasons(state, spec)
    cgroups = state.cgroups
    if init == "systemd" and (not cgroups.usable() or cgroups.v2_parent is None):
        reasons.append(
            "init='systemd' needs a cgroup v2 hierarchy (cgroup2 at /sys/fs/cgroup or "
            "/sys/fs/cgroup/unified) for the guest's systemd: none is usable here; use "
            "init='none'"
        )
    return reasons


def unavailable_for(state: State, spec: MachineSpec) -> str | None:
    """Why ``spec`` cannot be made here (see :class:`~pytest_vmenv.backend.SpecCheck`).

    Root makes every spec but these: ``disk=`` needs loop devices and mkfs.ext4, from
    :data:`.disk.MIN_SIZE` up; a Debian image that is not built yet needs its builder
    (see :func:`pytest_vmenv.images.builder_problem`) and the host's apt to serve its
    suite; systemd needs a cgroup v2 hierarchy. Unprivileged, ``image="host"`` is refused,
    Debian images without subordinate ids (or built by root), and ``init="systemd"`` without
    a delegated cgroup v2 group. Each refusal has its own
    reason (all that apply are given).
    """
    init = spec.init or ("systemd" if recipe_of(spec) else "none")
    if userns.rootless():
        reasons = _unprivileged_reasons(state, spec, init)
    else:
        reasons = _root_reasons(state, spec, init)
    return "; and ".join(reasons) or None


def refuse(state: State, spec: MachineSpec, *, template: bool) -> None:
    """Raise BackendUnavailable for a spec this process cannot make.

    A template is built without a network, so only its image can be refused; a clone is
    refused for anything :func:`unavailable_for` names.
    """
    shape = replace(spec, network=None) if template else spec
    reason = unavailable_for(state, shape)
    if reason is not None:
        raise errors.BackendUnavailable(NAME, reason)


def init_of(spec: MachineSpec) -> str:
    """The init a guest of ``spec`` boots: systemd on a built Debian image by default."""
    init = spec.init or ("systemd" if recipe_of(spec) is not None else "none")
    if init == "systemd" and is_host(spec.image, spec.image_config):
        raise errors.ConfigError(
            f"{NAME}: init='systemd' cannot boot image 'host' (a view of the host's own "
            "system); use image='debian-12' or a rootfs with systemd, or init='none'"
        )
    return init


def restrictions(state: State) -> str | None:
    """What the emulator cannot make here: as non-root, see :mod:`.userns`."""
    if not userns.rootless():
        return None
    cgroups = state.cgroups
    delegated = cgroups.offers("memory") and cgroups.offers("cpu")
    limits = "" if delegated else "; memory and cpus limits are not applied"
    full = subids.problem(SUBIDS_PURPOSE) is None
    debian = "Debian images (full uid map)" if full else "no Debian images (no subordinate ids)"
    systemd = "init='systemd'" if cgroups.v2_parent is not None else "no init='systemd'"
    return (
        f"unprivileged, uid {os.geteuid()}: rootfs directory and tarball images, {debian}, "
        f"{systemd} (it needs a delegated cgroup v2 group); image='host' needs root{limits}"
    )


def warn_unfiltered() -> None:
    """Once per process: on this architecture guests run without the seccomp filter."""
    if not seccomp.SUPPORTED and "seccomp" not in _WARNED:
        _WARNED.add("seccomp")
        warnings.warn(
            f"emulator: no seccomp filter on {platform.machine()} (x86_64 only); guests "
            "can use the host's kernel keyrings, bpf and perf_event_open",
            RuntimeWarning,
            stacklevel=4,
        )


def warn_limits(problems: Sequence[str]) -> None:
    """Once per process and problem: a guest runs without a limit (:class:`LimitNotApplied`)."""
    for problem in problems:
        if problem not in _WARNED:
            _WARNED.add(problem)
            warnings.warn(
                f"emulator: {problem}; guests run without that limit",
                LimitNotApplied,
                stacklevel=4,
            )
