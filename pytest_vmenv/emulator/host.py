"""Host-side guest lifecycle: the zygote connection, starting and stopping one guest.

A guest lives in ``<state>/emulator/guests/<id>/``: ``meta.json`` (its labels: session,
owner pid, name, PID 1's host pid, cgroups, layer stack), ``upper``/``work`` (its overlay
upper dir), ``root``/``base``/``empty`` (mount points used only inside its own mount
namespace), ``boot.log`` (what PID 1 printed, and provision output) and ``console.log``
(bound on the guest's ``/dev/console``). ``meta.json`` is written before anything is started, so a
half-created guest is always found and destroyable.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire
from .cgroups import Cgroups, GuestGroups
from .control import Conn

__all__ = ["Guest", "Zygote", "read_meta", "start_guest", "stop_guest"]

_PKG_PARENT = str(Path(__file__).resolve().parents[2])


class Zygote:
    """The helper process that forks guests (started lazily, once)."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> socket.socket:
        mine, theirs = wire.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PKG_PARENT, env.get("PYTHONPATH", "")) if p
        )
        self._log.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_vmenv.emulator.zygote", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                cwd="/",
            )
        theirs.close()
        self._sock = mine
        return mine

    def spawn(self, cfg: dict[str, Any], cgroups: list[str], ctl_fd: int) -> int:
        """Fork a guest; returns its keeper's pid."""
        with self._lock:
            sock = self._sock or self._start()
            wire.send(sock, {"op": "spawn", "cfg": cfg, "cgroups": cgroups}, [ctl_fd])
            reply, _ = wire.recv(sock)
        if reply is None:
            raise OSError("the emulator's zygote process exited")
        if "error" in reply:
            raise OSError(str(reply["error"]))
        return int(reply["pid"])

    def close(self) -> None:
        """Stop the zygote (its guests die with it)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


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
    owner_pid: int = field(default_factory=os.getpid)
    created: float = field(default_factory=time.time)
    snapshots: list[str] = field(default_factory=list)
    memory: int | None = None
    cpus: int | None = None

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "session": self.session,
            "owner_pid": self.owner_pid,
            "pid": self.pid,
            "keeper": self.keeper,
            "created": self.created,
            "stack": self.stack,
            "ip": self.ip,
            "network": self.network,
            "snapshots": self.snapshots,
            "cgroups": [str(d) for d in self.groups.dirs],
        }

    def save(self) -> None:
        tmp = self.dir / ".meta.json.tmp"
        tmp.write_text(json.dumps(self.meta()))
        tmp.rename(self.dir / "meta.json")


def read_meta(gdir: Path) -> dict[str, Any] | None:
    """A guest's labels, or None when its dir or meta file is gone or torn."""
    try:
        data = json.loads((gdir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fresh_dirs(gdir: Path) -> None:
    for sub in ("upper", "work"):
        shutil.rmtree(gdir / sub, ignore_errors=True)
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
) -> list[str]:
    """Create the guest's dirs and cgroups, fork it, wait for ready. Returns limit problems.

    On failure the guest is left half-created (its meta says what exists) for
    :func:`stop_guest` to remove.
    """
    guest.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _fresh_dirs(guest.dir)
    guest.save()  # labels first: a half-created guest is always found
    groups, problems = cgroups.create(guest.id, memory, cpus)
    guest.groups = groups
    console = guest.dir / "console.log"
    console.touch(mode=0o600)
    prefix = f"{layers_root}/"
    stack = [s[len(prefix) :] if s.startswith(prefix) else s for s in guest.stack]
    cfg = {
        "gdir": str(guest.dir),
        "stack": stack,
        "layers_root": str(layers_root),
        "hostname": guest.name,
        "console": str(console),
        "boot_log": str(guest.dir / "boot.log"),
    }
    mine, theirs = wire.socketpair()
    try:
        guest.keeper = zygote.spawn(cfg, groups.procs_files(), theirs.fileno())
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    guest.conn = Conn(mine)
    ready = select.select([mine], [], [], timeout)[0]
    if not ready:
        raise TimeoutError(f"guest {guest.name!r} was not ready within {timeout:g}s")
    msg, _fds = wire.recv(mine)
    if msg is None or "error" in msg:
        detail = (msg or {}).get("error") or "PID 1 exited during boot"
        raise OSError(f"guest {guest.name!r} failed to boot:\n{detail}")
    guest.pid = int(msg["pid"])
    guest.save()
    return problems


def stop_guest(guest: Guest, timeout: float = 5.0) -> None:
    """Kill every process of the guest and remove its cgroups (not its dir)."""
    if guest.conn is not None:
        guest.conn.close()
        guest.conn = None
    pidfd = -1
    if guest.pid:
        try:
            pidfd = os.pidfd_open(guest.pid)
        except OSError:
            pidfd = -1
    try:
        # PID 1 sees end-of-file and exits; the kernel then kills its namespace.
        if pidfd >= 0 and not select.select([pidfd], [], [], 0.5)[0]:
            guest.groups.kill()
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], timeout)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    guest.groups.kill()
    guest.groups.remove(timeout)
    guest.pid = 0
