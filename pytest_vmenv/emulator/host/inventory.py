"""What is on disk: guests as :class:`MachineRef` (for ``owned()``) and the layers they use.

Read-only and process-independent: everything comes from ``meta.json`` files and ``/proc``,
so a sweeper in another process (``vmenv gc``, the crash watchdog) sees exactly what the
creating process would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...backend import MachineRef
from .pids import pid_alive
from .record import read_meta

__all__ = ["refs", "ref_of", "stacks_in_use", "state_of"]

NAME = "emulator"


def state_of(meta: dict[str, Any]) -> str:
    """``creating`` (no PID 1 yet), ``kept``/``running`` (PID 1 alive) or ``gone``."""
    pid = int(meta.get("pid") or 0)
    if not pid:
        return "creating"
    if not pid_alive(pid, str(meta.get("pid_start", ""))):
        return "gone"
    return "kept" if meta.get("kept") else "running"


def ref_of(meta: dict[str, Any], gdir: Path) -> MachineRef:
    """The :class:`MachineRef` a guest's labels stand for."""
    return MachineRef(
        backend=NAME,
        id=gdir.name,
        name=str(meta.get("name", "")),
        session=str(meta.get("session", "")),
        ip=meta.get("ip"),
        data={
            "pid": int(meta.get("pid") or 0),
            "keeper": int(meta.get("keeper") or 0),
            "state": state_of(meta),
            "dir": str(gdir),
            "network": meta.get("network"),
        },
        owner=str(meta.get("owner", "")),
        created=float(meta.get("created") or 0.0),
        kept=bool(meta.get("kept")),
    )


def refs(root: Path, session: str | None) -> list[MachineRef]:
    """Every guest under ``root`` with a readable ``meta.json`` (of ``session``, if given)."""
    found: list[MachineRef] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    for gdir in entries:
        meta = read_meta(gdir)
        if meta is None or (session is not None and meta.get("session") != session):
            continue
        found.append(ref_of(meta, gdir))
    return found


def stacks_in_use(root: Path, exclude: str) -> set[str]:
    """Every layer some guest on disk (other than ``exclude``) stacks on."""
    used: set[str] = set()
    try:
        entries = list(root.iterdir())
    except OSError:
        return used
    for gdir in entries:
        if gdir.name != exclude and (meta := read_meta(gdir)) is not None:
            used.update(str(s) for s in meta.get("stack", []))
    return used
