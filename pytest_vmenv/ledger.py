"""The ledger: a write-ahead record of what each pytest process is making, in the state dir.

Layout: ``<state>/ledger/<session id>/<worker>-<pid>/`` holds ``owner.json`` (the owner
token, the session, the backends in use with their non-secret options) and one ``<n>.json``
per resource intent; ``<state>/ledger/<session id>/_templates/<key>.json`` records the
session's templates, which its xdist workers share and the last one out removes.

An intent is written (atomically: temp file + rename) *before* the resource is created and
removed once it is gone, so a process killed at any point leaves enough behind for a sweep
to find what it may have made. A clean goodbye removes the owner's directory. Concurrent
sessions and xdist workers never share a file; session-wide steps take ``fcntl`` locks
under ``<state>/locks``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import Session, owner_alive

__all__ = [
    "Ledger",
    "OwnerRecord",
    "file_lock",
    "flocked",
    "owners",
    "public_options",
    "remove_owner",
    "remove_session_dir",
    "session_templates",
    "sessions",
    "write_json",
]

_SECRET_WORDS = ("password", "passwd", "secret", "token", "key", "credential")


def public_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Backend options without anything that looks like a secret (never written to disk)."""
    return {
        k: v for k, v in options.items() if not any(word in k.lower() for word in _SECRET_WORDS)
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as the JSON file ``path``, atomically: a reader sees the old file or the new
    one, never a torn one (a hidden temporary file beside it is renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def flocked(path: Path, *, shared: bool = False, wait: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on the file ``path`` (made if missing; released on exit or death).

    ``shared``: a shared one instead (any number of holders, none while an exclusive one is
    held). ``wait=False``: ``BlockingIOError`` at once if the lock is held elsewhere.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(state_dir: Path, name: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<state>/locks/<name>.lock`` (released on exit or death)."""
    locks = state_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with flocked(locks / f"{name}.lock"):
        yield


@dataclass(frozen=True)
class OwnerRecord:
    """One process's entry in the ledger, as a sweep reads it."""

    dir: Path
    session: str
    owner: str
    backends: Mapping[str, Mapping[str, Any]]
    created: float

    @property
    def alive(self) -> bool:
        return owner_alive(self.owner)


def owners(state_dir: Path, session: str | None = None) -> list[OwnerRecord]:
    """Every owner recorded in the ledger (of ``session`` only, if given)."""
    root = state_dir / "ledger"
    found = []
    sessions = [root / session] if session else sorted(root.glob("*"))
    for sdir in sessions:
        for odir in sorted(sdir.glob("[!_]*")):
            try:
                meta = json.loads((odir / "owner.json").read_text())
            except (OSError, ValueError):
                meta = {"session": sdir.name, "owner": "", "backends": {}, "created": 0}
            found.append(
                OwnerRecord(
                    dir=odir,
                    session=str(meta.get("session", sdir.name)),
                    owner=str(meta.get("owner", "")),
                    backends=meta.get("backends", {}),
                    created=float(meta.get("created", 0)),
                )
            )
    return found


def session_templates(state_dir: Path, session: str) -> list[tuple[Path, dict[str, Any]]]:
    """The template records of ``session``: (record file, data)."""
    found = []
    for f in sorted((state_dir / "ledger" / session / "_templates").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            found.append((f, json.loads(f.read_text())))
    return found


def sessions(state_dir: Path) -> list[str]:
    return sorted(p.name for p in (state_dir / "ledger").glob("*") if p.is_dir())


def remove_session_dir(state_dir: Path, session: str) -> None:
    """Remove a session's ledger dir once neither an owner nor a template record is left."""
    sdir = state_dir / "ledger" / session
    if any(p.name[0] != "_" for p in sdir.glob("*")) or any(sdir.glob("_templates/*.json")):
        return  # an owner, or a template whose removal failed: kept for the next sweep
    shutil.rmtree(sdir, ignore_errors=True)


def remove_owner(record: OwnerRecord) -> None:
    shutil.rmtree(record.dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        record.dir.parent.rmdir()  # the session's dir, once its last owner is gone


class Ledger:
    """This process's part of the ledger."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.dir = session.state_dir / "ledger" / session.id / f"{session.worker_id}-{os.getpid()}"
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._backends: dict[str, dict[str, Any]] = {}
        self.created = time.time()

    def _write_owner(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(
            self.dir / "owner.json",
            {
                "session": self.session.id,
                "worker": self.session.worker_id,
                "owner": self.session.owner,
                "created": self.created,
                "backends": self._backends,
                "cwd": os.getcwd(),
            },
        )

    def open(self) -> None:
        with self._lock:
            self._write_owner()

    def add_backend(self, name: str, options: Mapping[str, Any]) -> None:
        """Record that this process uses ``name`` (so a sweep knows where to look)."""
        with self._lock:
            self._backends[name] = public_options(options)
            self._write_owner()

    def intend(self, kind: str, backend: str, name: str, **data: Any) -> Path:
        """Write an intent before creating a resource; returns its record."""
        with self._lock:
            path = self.dir / f"{next(self._seq)}.json"
        write_json(
            path,
            {"kind": kind, "backend": backend, "name": name, "at": time.time(), **data},
        )
        return path

    def template_intent(self, key: str, backend: str, **data: Any) -> Path:
        """Record a session template before it is built (shared by the session's workers)."""
        tdir = self.dir.parent / "_templates"
        tdir.mkdir(parents=True, exist_ok=True)
        path = tdir / f"{key}.json"
        if not path.exists():
            write_json(path, {"kind": "template", "backend": backend, "key": key, **data})
        return path

    def update(self, record: Path, **data: Any) -> None:
        try:
            current = json.loads(record.read_text())
        except (OSError, ValueError):
            current = {}
        write_json(record, {**current, **data})

    @staticmethod
    def forget(record: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            record.unlink()

    def goodbye(self) -> None:
        """A clean end: this process's records are no longer needed."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()
