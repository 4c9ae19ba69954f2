"""Host-side guest lifecycle: starting, attaching to and stopping one guest.

A guest lives in ``<state>/emulator/guests/<id>/``: ``meta.json`` (its labels: session,
owner token, name, PID 1's and its keeper's host pids with their start times, cgroups, layer
stack, kept flag), ``upper``/``work`` (its overlay upper dir), ``root``/``base``/``empty``
(mount points used only inside its own mount namespace), ``ctl.sock`` (PID 1's listener for
other processes, see :mod:`.guest`), ``boot.log`` (what PID 1 printed, and provision output)
and ``console.fifo`` (bound on the guest's ``/dev/console``) with ``console.log`` (what came
through it, capped, see :mod:`.console`); with ``disk=``, ``disk.img`` mounted on ``disk/``
holds the upper and work dirs instead (see :mod:`.disk`). ``meta.json`` is written before
anything is started and again after every step that creates something (cgroups, keeper,
PID 1), so a half-created guest is always found and destroyable, from any process.

Pids from ``meta.json`` are only ever signalled through a pidfd opened *before* checking the
process's start time against the recorded one: a reused pid is never killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...backend import process_start
from .. import wire
from ..guest import console
from . import disk, userns
from .cgroups import DEFAULT_PIDS_MAX, Cgroups, GuestGroups
from .control import CommandTimedOut, Conn
from .spawner import Zygote

__all__ = [
    "Guest",
    "connect",
    "guest_from_meta",
    "pid_alive",
    "read_meta",
    "start_guest",
    "stop_guest",
    "wait_systemd",
]

_SOCK_MAX = 100  # sun_path is 108 bytes; longer paths go through /proc/self/fd


@dataclass
class Guest:
    """One live (or half-created) guest as the backend holds it."""

    id: str
    name: str
    session: str
    dir: Path
    stack: list[str]
    groups: GuestGroups = field(default_factory=GuestGroups)
    conn: Conn | None = None
    pid: int = 0
    keeper: int = 0
    ip: str | None = None
    network: str | None = None
    owner: str = ""
    created: float = field(default_factory=time.time)
    snapshots: list[str] = field(default_factory=list)
    memory: int | None = None
    cpus: int | None = None
    disk: int | None = None
    pid_start: str = ""
    keeper_start: str = ""
    zygote: int = 0
    kept: bool = False
    attached: bool = False  # another process's guest we only talk to (via ctl.sock)
    init: str = "none"  # "systemd": PID 1 is systemd, commands go to its agent (see .guest)

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "session": self.session,
            "owner": self.owner,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "keeper": self.keeper,
            "keeper_start": self.keeper_start,
            "zygote": self.zygote,
            "created": self.created,
            "kept": self.kept,
            "stack": self.stack,
            "ip": self.ip,
            "network": self.network,
            "snapshots": self.snapshots,
            "cgroups": [str(d) for d in self.groups.leaves],
            "groups": self.groups.to_json(),
        }

    def save(self) -> None:
        """Write ``meta.json`` atomically (unique temp name: threads and processes may race)."""
        tmp = self.dir / f".meta.json.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(self.meta()))
        tmp.rename(self.dir / "meta.json")


def guest_from_meta(gid: str, gdir: Path, meta: dict[str, Any], cgroups: Cgroups) -> Guest:
    """A :class:`Guest` rebuilt from another process's ``meta.json`` (no connection)."""
    guest = Guest(
        id=gid,
        name=str(meta.get("name", "")),
        session=str(meta.get("session", "")),
        dir=gdir,
        stack=[str(s) for s in meta.get("stack", [])],
        network=meta.get("network"),
        owner=str(meta.get("owner", "")),
        created=float(meta.get("created") or 0.0),
        snapshots=[str(s) for s in meta.get("snapshots", [])],
        pid=int(meta.get("pid") or 0),
        pid_start=str(meta.get("pid_start", "")),
        keeper=int(meta.get("keeper") or 0),
        keeper_start=str(meta.get("keeper_start", "")),
        zygote=int(meta.get("zygote") or 0),
        kept=bool(meta.get("kept")),
        ip=meta.get("ip"),
        attached=True,
    )
    guest.groups = cgroups.adopt(gid, meta.get("groups") or {}, meta.get("cgroups") or [])
    return guest


def _pidfd(pid: int, start: str) -> int:
    """A pidfd of ``pid`` if it is still the process that started at ``start``, else -1.

    The pidfd is opened first and the start time checked after: if the check passes, the
    pidfd names that very process, even if the pid is reused later.
    """
    if pid <= 0 or not start:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    if process_start(pid) != start:
        os.close(fd)
        return -1
    return fd


def readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds (poll: any fd number works)."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(max(0, int(timeout * 1000 + 0.999))))


def pid_alive(pid: int, start: str) -> bool:
    """Whether the process recorded as ``pid``/``start`` still runs."""
    fd = _pidfd(pid, start)
    if fd < 0:
        return False
    try:
        return not readable(fd, 0)
    finally:
        os.close(fd)


def connect(gdir: Path) -> Conn:
    """Open a new control connection to a running guest's PID 1 (``ctl.sock``)."""
    path = str(gdir / "ctl.sock")
    dfd = -1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        if len(path.encode()) > _SOCK_MAX:
            dfd = os.open(gdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            path = f"/proc/self/fd/{dfd}/ctl.sock"
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    finally:
        if dfd >= 0:
            os.close(dfd)
    return Conn(sock)


def read_meta(gdir: Path) -> dict[str, Any] | None:
    """A guest's labels, or None when its dir or meta file is gone or torn."""
    try:
        data = json.loads((gdir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fresh_dirs(gdir: Path) -> None:
    for sub in ("upper", "work"):
        userns.rmtree(gdir / sub)
    for sub in ("upper", "work", "root", "base", "empty"):
        (gdir / sub).mkdir(mode=0o755, exist_ok=True)


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
    upper, work = guest.dir / "upper", guest.dir / "work"
    guest.pid = guest.keeper = 0
    guest.save()  # labels first: a half-created guest is always found
    rootless = userns.rootless()
    problems: list[str] = []
    nproc = pids  # unprivileged, RLIMIT_NPROC in the guest's user namespace either way
    if rootless:  # delegated cgroups only, and RLIMIT_NPROC (see .userns)
        has = {c: cgroups.offers(c) for c in ("memory", "cpu", "pids")}
        problems += userns.limit_problems(
            None if has["memory"] else memory, None if has["cpu"] else cpus
        )
        memory, cpus = (memory if has["memory"] else None), (cpus if has["cpu"] else None)
        pids = pids if has["pids"] else None

    def make_groups() -> None:  # while the zygote forks the keeper, which waits for them
        guest.groups, more = cgroups.create(guest.id, memory, cpus, pids)
        problems.extend(more)
        guest.save()
        if guest.init == "systemd" and guest.groups.v2 is None:  # it manages its v2 leaf
            raise OSError(
                "init='systemd' needs a cgroup v2 hierarchy for the guest (cgroup2 mounted at "
                "/sys/fs/cgroup or /sys/fs/cgroup/unified); none is usable here"
            )

    if guest.disk is not None and rootless:
        problems.append(
            "the disk limit is not applied: pytest runs unprivileged and the emulator's "
            "user-namespace mode cannot mount a filesystem of that size (run as root)"
        )
    elif guest.disk is not None:
        upper, work = disk.attach(guest.dir, guest.disk, layers_root.parent / "disks")
    (guest.dir / console.LOG).touch(mode=0o600)
    fifo = guest.dir / console.FIFO
    if not fifo.is_fifo():
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
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
    if rootless:
        cfg["userns"] = [os.getuid(), os.getgid()]
        if nproc is not None:
            cfg["nproc"] = nproc
    if guest.init == "systemd":
        cfg.update(init="systemd", machine_id=uuid.uuid4().hex)
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
    guest.conn = Conn(mine)
    if not readable(mine.fileno(), timeout):
        raise TimeoutError(f"guest {guest.name!r} was not ready within {timeout:g}s")
    msg, _fds = wire.recv(mine)
    if msg is None or "error" in msg:
        detail = (msg or {}).get("error") or "PID 1 exited during boot"
        raise OSError(f"guest {guest.name!r} failed to boot:\n{detail}")
    guest.pid = int(msg["pid"])
    guest.pid_start = process_start(guest.pid)
    guest.save()
    return problems


_BOOTED = ("running", "degraded")


def wait_systemd(guest: Guest, timeout: float) -> str:
    """Wait until systemd in ``guest`` has booted: ``systemctl is-system-running --wait``
    says ``running`` or ``degraded`` (returned; the failed units of a degraded boot are noted
    in ``boot.log``). Asked again while systemd is not up yet to answer at all. TimeoutError
    after ``timeout``; OSError if systemd went to ``maintenance`` or ``stopping``.
    """
    assert guest.conn is not None
    started = time.monotonic()
    deadline = started + timeout
    state = ""
    while state not in _BOOTED:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"systemd in guest {guest.name!r} did not finish booting within {timeout:g}s "
                f"(systemctl is-system-running: {state or 'no answer'})"
            )
        try:
            _code, out, _err = guest.conn.execute(
                ["systemctl", "is-system-running", "--wait"],
                input=None, env=None, user=None, timeout=left,
            )  # fmt: skip
        except CommandTimedOut:
            continue
        state = out.value().decode("utf-8", "replace").strip()
        if state in ("maintenance", "stopping"):
            raise OSError(f"systemd in guest {guest.name!r} is in state {state!r}, not booted")
        if state not in _BOOTED:
            time.sleep(0.005)
    note = f"vmenv: systemd is {state} after {time.monotonic() - started:.2f}s\n"
    if state == "degraded":
        _code, out, _err = guest.conn.execute(
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
    fds = [_pidfd(guest.pid, guest.pid_start), _pidfd(guest.keeper, guest.keeper_start)]
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
