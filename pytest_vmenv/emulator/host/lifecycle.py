"""Host-side guest lifecycle: starting one guest, waiting for its systemd, stopping it.

What a guest's dir holds is in :mod:`.record`. A guest is started in four steps: its dirs
(and, with ``disk=``, its own filesystem, :mod:`.disk`), its spawn config (what the keeper
and PID 1 read, :func:`spawn_config`), the fork by the zygote (the host makes the guest's
cgroups meanwhile, and the keeper joins them on ``go``), and PID 1's ``ready``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ...backend import process_start
from ...images import subids
from ...poll import poll_until
from .. import wire
from ..guest import console
from . import disk, userns
from .cgroups import DEFAULT_PIDS_MAX, Cgroups
from .control import CommandTimedOut, Conn
from .pids import pidfd, readable
from .record import Guest
from .spawner import Zygote

__all__ = ["spawn_config", "start_guest", "stop_guest", "wait_systemd"]


def _fresh_dirs(gdir: Path) -> None:
    for sub in ("upper", "work"):
        userns.rmtree(gdir / sub)
    for sub in ("upper", "work", "root", "base", "empty"):
        (gdir / sub).mkdir(mode=0o755, exist_ok=True)


class _Limits:
    """The limits a guest gets and the ones it runs without (``problems``, warned once)."""

    def __init__(
        self, cgroups: Cgroups, memory: int | None, cpus: int | None, pids: int | None
    ) -> None:
        self.memory, self.cpus, self.pids = memory, cpus, pids
        self.nproc = pids  # unprivileged, RLIMIT_NPROC in the guest's user namespace either way
        self.problems: list[str] = []
        if userns.rootless():  # delegated cgroups only, and RLIMIT_NPROC (see .userns)
            has = {c: cgroups.offers(c) for c in ("memory", "cpu", "pids")}
            self.problems += userns.limit_problems(
                None if has["memory"] else memory, None if has["cpu"] else cpus
            )
            self.memory = memory if has["memory"] else None
            self.cpus = cpus if has["cpu"] else None
            self.pids = pids if has["pids"] else None


def _upper(guest: Guest, disks: Path, problems: list[str]) -> tuple[Path, Path]:
    """The guest's overlay upper and work dirs: on a filesystem of ``guest.disk`` bytes (as
    root; unprivileged that is a limit problem), else in its dir."""
    if guest.disk is None:
        return guest.dir / "upper", guest.dir / "work"
    if userns.rootless():
        problems.append(
            "the disk limit is not applied: pytest runs unprivileged and the emulator's "
            "user-namespace mode cannot mount a filesystem of that size (run as root)"
        )
        return guest.dir / "upper", guest.dir / "work"
    return disk.attach(guest.dir, guest.disk, disks)


def _console_fifo(gdir: Path) -> Path:
    (gdir / console.LOG).touch(mode=0o600)
    fifo = gdir / console.FIFO
    if not fifo.is_fifo():
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
    return fifo


def spawn_config(
    guest: Guest, layers_root: Path, upper: Path, work: Path, nproc: int | None
) -> dict[str, Any]:
    """What the keeper and PID 1 are told (see :func:`..guest.mounts.build_root`)."""
    fifo = _console_fifo(guest.dir)
    prefix = f"{layers_root}/"
    stack = [s[len(prefix) :] if s.startswith(prefix) else s for s in guest.stack]
    cfg: dict[str, Any] = {
        "go": True,
        "gdir": str(guest.dir),
        "stack": stack,
        "layers_root": str(layers_root),
        "hostname": guest.name,
        "console": str(fifo),
        "console_relay": True,
        "boot_log": str(guest.dir / "boot.log"),
        "upper": str(upper),
        "work": str(work),
    }
    if userns.rootless():
        cfg["userns"] = [os.getuid(), os.getgid()]
        ids = subids.lookup()
        if ids is not None:  # a full map (see .userns)
            cfg["subids"] = {"newuidmap": ids.newuidmap, "newgidmap": ids.newgidmap,
                             "uid": ids.uid_map(), "gid": ids.gid_map()}  # fmt: skip
        if nproc is not None:
            cfg["nproc"] = nproc
    if guest.init == "systemd":
        cfg.update(init="systemd", machine_id=uuid.uuid4().hex)
    return cfg


def _fork(
    guest: Guest, zygote: Zygote, cgroups: Cgroups, cfg: dict[str, Any], limits: _Limits
) -> socket.socket:
    """Have the zygote fork the keeper, make the cgroups meanwhile, send ``go``; our end."""

    def make_groups() -> None:  # while the zygote forks the keeper, which waits for them
        guest.groups, more = cgroups.create(guest.id, limits.memory, limits.cpus, limits.pids)
        limits.problems.extend(more)
        guest.save()
        if guest.init == "systemd" and guest.groups.v2 is None:  # it manages its v2 leaf
            raise OSError(
                "init='systemd' needs a cgroup v2 hierarchy for the guest (cgroup2 mounted at "
                "/sys/fs/cgroup or /sys/fs/cgroup/unified); none is usable here"
            )

    mine, theirs = wire.socketpair()
    try:
        guest.keeper = zygote.spawn(cfg, [], theirs.fileno(), meanwhile=make_groups)
        wire.send(mine, {"op": "go", "cgroups": guest.groups.procs_files()})
        guest.keeper_start = process_start(guest.keeper)  # while the keeper boots the guest
        guest.zygote = zygote.pid or 0
        guest.save()
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return mine


def _ready(guest: Guest, mine: socket.socket, timeout: float) -> None:
    """Wait for PID 1's first message: ``ready`` with its host pid, or its boot error."""
    if not readable(mine.fileno(), timeout):
        raise TimeoutError(f"guest {guest.name!r} was not ready within {timeout:g}s")
    msg, _fds = wire.recv(mine)
    if msg is None or "error" in msg:
        detail = (msg or {}).get("error") or "PID 1 exited during boot"
        raise OSError(f"guest {guest.name!r} failed to boot:\n{detail}")
    guest.pid = int(msg["pid"])
    guest.pid_start = process_start(guest.pid)
    guest.save()


def start_guest(
    guest: Guest,
    zygote: Zygote,
    cgroups: Cgroups,
    layers_root: Path,
    memory: int | None,
    cpus: int | None,
    timeout: float,
    pids: int | None = DEFAULT_PIDS_MAX,
) -> list[str]:
    """Create the guest's dirs and cgroups, fork it, wait for ready. Returns limit problems.

    ``guest.disk`` set, its upper and work dirs go on a filesystem of that size (as root;
    unprivileged it is a limit problem). On failure the guest is left half-created (its
    meta says what exists) for :func:`stop_guest` and :func:`.disk.detach` to remove.
    """
    guest.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _fresh_dirs(guest.dir)
    guest.pid = guest.keeper = 0
    guest.save()  # labels first: a half-created guest is always found
    limits = _Limits(cgroups, memory, cpus, pids)
    upper, work = _upper(guest, layers_root.parent / "disks", limits.problems)
    cfg = spawn_config(guest, layers_root, upper, work, limits.nproc)
    mine = _fork(guest, zygote, cgroups, cfg, limits)
    guest.conn = Conn(mine)
    _ready(guest, mine, timeout)
    return limits.problems


_BOOTED = ("running", "degraded")


def wait_systemd(guest: Guest, timeout: float) -> str:
    """Wait until systemd in ``guest`` has booted: ``systemctl is-system-running --wait``
    says ``running`` or ``degraded`` (returned; the failed units of a degraded boot are noted
    in ``boot.log``). Asked again while systemd is not up yet to answer at all. TimeoutError
    after ``timeout``; OSError if systemd went to ``maintenance`` or ``stopping``.
    """
    conn = guest.conn
    assert conn is not None
    started = time.monotonic()
    deadline = started + timeout
    seen = [""]

    def booted(last_try: bool) -> str | None:
        left = deadline - time.monotonic()
        if last_try or left <= 0:
            raise TimeoutError(
                f"systemd in guest {guest.name!r} did not finish booting within {timeout:g}s "
                f"(systemctl is-system-running: {seen[0] or 'no answer'})"
            )
        try:
            _code, out, _err = conn.execute(
                ["systemctl", "is-system-running", "--wait"],
                input=None, env=None, user=None, timeout=left,
            )  # fmt: skip
        except CommandTimedOut:
            return None
        seen[0] = state = out.value().decode("utf-8", "replace").strip()
        if state in ("maintenance", "stopping"):
            raise OSError(f"systemd in guest {guest.name!r} is in state {state!r}, not booted")
        return state if state in _BOOTED else None

    state = poll_until(
        booted, timeout=max(timeout, 0.0), what="systemd's boot", interval=0.005, max_interval=0.05
    )
    note = f"vmenv: systemd is {state} after {time.monotonic() - started:.2f}s\n"
    if state == "degraded":
        _code, out, _err = conn.execute(
            ["systemctl", "--failed", "--no-legend", "--plain"],
            input=None, env=None, user=None, timeout=10,
        )  # fmt: skip
        note += "vmenv: failed units: " + out.value().decode("utf-8", "replace").strip() + "\n"
    with open(guest.dir / "boot.log", "a", encoding="utf-8") as f:
        f.write(note)
    return state


def stop_guest(guest: Guest, timeout: float = 5.0) -> None:
    """Kill every process of the guest and remove its cgroups (not its dir).

    Our own guest that is not kept gets the fast path: closing its control socket makes PID 1
    exit (the kernel then kills its PID namespace); a systemd guest's PID 1 is killed at once.
    Everything else, and anything still running after 0.5 s, is killed: ``cgroup.kill`` (or
    SIGKILL to every listed pid) plus SIGKILL through verified pidfds of PID 1 and its keeper
    (the keeper may not have joined the cgroups yet in a half-created guest). Done means every
    pidfd reported the exit and every cgroup could be removed (an ``rmdir`` of a group with
    tasks fails, and is retried with more kills until ``timeout``).
    """
    graceful = (
        guest.conn is not None and not guest.kept and not guest.attached and guest.init != "systemd"
    )  # systemd stays when its agent goes: it is killed at once
    if guest.conn is not None:
        guest.conn.close()
        guest.conn = None
    fds = [pidfd(guest.pid, guest.pid_start), pidfd(guest.keeper, guest.keeper_start)]
    live = [fd for fd in fds if fd >= 0]
    try:
        if graceful and fds[0] >= 0:
            readable(fds[0], 0.5)
        live = [fd for fd in live if not readable(fd, 0)]
        if live:
            guest.groups.kill()
            for fd in live:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            for fd in live:
                readable(fd, max(0.0, deadline - time.monotonic()))
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    guest.groups.remove(timeout)  # kills what is still in a group it cannot remove
    guest.pid = 0
