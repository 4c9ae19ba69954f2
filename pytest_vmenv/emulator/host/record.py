"""A guest as the host records it: :class:`Guest` and its ``meta.json``.

A guest lives in ``<state>/emulator/guests/<id>/``: ``meta.json`` (its labels: session,
owner token, name, PID 1's and its keeper's host pids with their start times, cgroups, layer
stack, kept flag), ``upper``/``work`` (its overlay upper dir), ``root``/``base``/``empty``
(mount points used only inside its own mount namespace), ``ctl.sock`` (PID 1's listener for
other processes, see :mod:`..guest.pid1`), ``boot.log`` (what PID 1 printed, and provision
output) and ``console.fifo`` (bound on the guest's ``/dev/console``) with ``console.log``
(what came through it, capped, see :mod:`..guest.console`); with ``disk=``, ``disk.img``
mounted on ``disk/`` holds the upper and work dirs instead (see :mod:`.disk`). ``meta.json``
is written before anything is started and again after every step that creates something
(cgroups, keeper, PID 1), so a half-created guest is always found and destroyable, from any
process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...backend import Network
from .cgroups import Cgroups, GuestGroups
from .control import Conn

__all__ = ["Guest", "guest_from_meta", "read_meta"]


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
    network: Network | None = None  # ours only: another process's guest never joins one
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
            "network": self.network.id if self.network else None,
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


def read_meta(gdir: Path) -> dict[str, Any] | None:
    """A guest's labels, or None when its dir or meta file is gone or torn."""
    try:
        data = json.loads((gdir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
