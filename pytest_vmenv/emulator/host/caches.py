"""What the emulator keeps between sessions, for ``vmenv images``, and its safe removal.

Under ``<state>/emulator``: templates, snapshots and torn builds (``layers/tpl-*``,
``snap-*``, ``.build-*``), the host image's mask layers (``layers/mask-*``) and unpacked
tarball images (``images/<sha256>``). Guests (``guests/``) are machines, not caches
(``vmenv ls``, ``vmenv gc``).

A cache is *held*, and ``vmenv images rm`` leaves it, while anything may still use it:

* a guest on disk (running, kept or dead) or another layer stacks on it;
* its session runs; a ``reuse`` template while any session runs (it may be reusing it);
* a session is building templates (it holds the caches lock, :func:`.layers.caches_lock`,
  shared), or a torn build's owner process still lives.

Removal takes the caches lock exclusive, without waiting (while a build holds it, removal
fails saying so), then decides again on what is on disk then. A build that starts meanwhile
waits for the lock, then finds the image gone and unpacks it anew. Under that lock no build
holds or opens a template's build lock file (``layers/.tpl-*.lock``), so the files of keys
whose layer is gone are deleted then (:func:`prune_build_locks`): they are never opened
all at once, and do not pile up one per template per session.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Collection
from pathlib import Path

from ... import errors
from ...backend import Cache, Snapshot, owner_alive
from ...caches import disk_usage
from . import layers, userns
from .record import read_meta

__all__ = ["BUILDING", "held_by", "listing", "prune_build_locks", "remove"]

NAME = "emulator"
_FRESH = 60.0  # an unlabelled build dir younger than this may be labelled any moment


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def _busy(lock: Path) -> bool:
    """Whether another process (or thread) holds the ``flock`` on ``lock``."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


BUILDING = "a session is building templates; try again when it is done"


def _building(emu_dir: Path) -> bool:
    """Whether a build (of any process) holds the caches lock now."""
    return _busy(emu_dir / layers.CACHES_LOCK)


def _prune(emu_dir: Path) -> None:
    """Delete the lock files of templates and unpacked images that are gone (the caller
    holds the caches lock exclusive, so no build holds or is about to open one)."""
    for root, prefix in ((emu_dir / "layers", ".tpl-"), (emu_dir / "images", ".")):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            lock = name.startswith(prefix) and name.endswith(".lock")
            if lock and not os.path.lexists(root / name[1:-5]):
                with contextlib.suppress(OSError):
                    os.unlink(root / name)


def prune_build_locks(emu_dir: Path) -> None:
    """Delete the build lock files of removed templates, if no build runs now (else later)."""
    with layers.caches_lock(emu_dir, exclusive=True) as taken:
        if taken:
            _prune(emu_dir)


def _users(emu_dir: Path, snaps: list[Snapshot]) -> dict[str, str]:
    """Stack entry (real path) -> who stacks on it: a guest on disk, or another layer."""
    users: dict[str, str] = {}
    try:
        guests = sorted((emu_dir / "guests").iterdir())
    except OSError:
        guests = []
    for gdir in guests:
        meta = read_meta(gdir)
        if meta is None:
            continue
        who = f"machine {meta.get('name', '?')} ({gdir.name}) stacks on it"
        for entry in meta.get("stack", []):
            users.setdefault(_real(str(entry)), who)
    for snap in snaps:
        own = _real(snap.handle) + os.sep
        who = f"{Path(snap.handle).name} stacks on it"
        for entry in snap.data.get("layers", []):
            real = _real(str(entry))
            if not real.startswith(own):
                users.setdefault(real, who)
    return users


def _user_of(path: Path, users: dict[str, str]) -> str:
    root = _real(path)
    for entry, who in users.items():
        if entry == root or entry.startswith(root + os.sep):
            return who
    return ""


def _machine_holder(emu_dir: Path, path: Path, users: dict[str, str]) -> str:
    """Which machine on disk still needs layer ``path``: one that stacks on it (directly or
    through another layer), or the machine a ``snap-*`` layer is a snapshot of; else ''."""
    held = _user_of(path, users)
    if not held and path.name.startswith("snap-"):
        guest = _guest_of(path)
        if guest and (emu_dir / "guests" / guest).exists():
            held = f"a snapshot of machine {guest}"
    return held


def held_by(emu_dir: Path, layer: Path) -> str:
    """Why a template or snapshot layer must stay because a machine on disk (running, kept
    or dead) needs it, or '' (the part of :func:`listing`'s *held* that sessions and builds
    play no part in: what ``remove_template`` checks)."""
    return _machine_holder(emu_dir, layer, _users(emu_dir, layers.listing(emu_dir / "layers")))


def _created(path: Path, meta: dict[str, object] | None = None) -> float:
    value = (meta or {}).get("created")
    if isinstance(value, int | float):
        return float(value)
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def listing(emu_dir: Path, live: Collection[str], *, locked: bool = False) -> list[Cache]:
    """Every cache under ``emu_dir`` with its size and, if held, why (module docstring).

    ``locked``: the caller holds the caches lock exclusive (so no build is running).
    """
    layers_dir = emu_dir / "layers"
    snaps = layers.listing(layers_dir)
    users = _users(emu_dir, snaps)
    building = not locked and _building(emu_dir)
    found = [_layer_cache(emu_dir, snap, users, live, building) for snap in snaps]
    labelled = {Path(snap.handle).name for snap in snaps}
    found += _unlabelled_layers(layers_dir, users, labelled, building)
    found += _tarball_images(emu_dir / "images", users, building)
    return found


def _kind(path: Path) -> str:
    if path.name.startswith(".build-"):
        return "torn build"
    return "snapshot" if path.name.startswith("snap-") else "template"


def _layer_cache(
    emu_dir: Path, snap: Snapshot, users: dict[str, str], live: Collection[str], building: bool
) -> Cache:
    """A template, snapshot or labelled torn build, and what holds it."""
    path = Path(snap.handle)
    kind = _kind(path)
    session = snap.session
    held = _machine_holder(emu_dir, path, users)
    if not held and session in live:
        held = f"session {session} is running"
    if not held and snap.reuse and live:
        held = "a running session may be reusing it (--vm-reuse)"
    if not held and kind == "torn build" and snap.owner and owner_alive(snap.owner):
        held = "its build is running"
    if not held and building:
        held = BUILDING
    return Cache(
        backend=NAME,
        kind=kind,
        id=path.name,
        size=disk_usage(path),
        path=str(path),
        detail=("reusable (--vm-reuse)" if snap.reuse else f"session {session or '?'}")
        + (f"; machine {snap.name}" if snap.name else ""),
        created=snap.created or _created(path),
        held=held,
        handle=snap,
    )


def _unlabelled_layers(
    layers_dir: Path, users: dict[str, str], labelled: set[str], building: bool
) -> list[Cache]:
    """Host masks, and torn builds that died before their labels were written."""
    found = []
    for path in _dirs(layers_dir):
        if path.name.startswith("mask-"):
            held = _user_of(path, users) or (BUILDING if building else "")
            found.append(_plain(path, "host mask", "what the host image hides", held))
        elif path.name.startswith(".build-") and path.name not in labelled:
            held = BUILDING if building else ""
            if not held and time.time() - _created(path) < _FRESH:
                held = "just created (a build may be labelling it)"
            found.append(_plain(path, "torn build", "an unlabelled build left behind", held))
    return found


def _tarball_images(images_dir: Path, users: dict[str, str], building: bool) -> list[Cache]:
    """Unpacked tarball images, and unpacks that did not finish."""
    found = []
    for path in _dirs(images_dir):
        if path.name.startswith("."):
            continue
        try:
            source = (path / "complete").read_text().strip()
        except OSError:
            source = ""
        held = _user_of(path, users) or (BUILDING if building else "")
        if not source:
            if not held and _busy(images_dir / f".{path.name}.lock"):
                held = "it is being unpacked"
            found.append(_plain(path, "torn unpack", "an unpack that did not finish", held))
        else:
            found.append(_plain(path, "tarball image", f"unpacked from {source}", held))
    return found


def _guest_of(layer: Path) -> str:
    try:
        meta = json.loads((layer / "meta.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(meta.get("guest") or "") if isinstance(meta, dict) else ""


def _dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _plain(path: Path, kind: str, detail: str, held: str) -> Cache:
    return Cache(
        backend=NAME,
        kind=kind,
        id=path.name,
        size=disk_usage(path),
        path=str(path),
        detail=detail,
        created=_created(path),
        held=held,
    )


def remove(emu_dir: Path, cache: Cache, live: Collection[str]) -> None:
    """Remove one cache unless it is held now (BackendError with the reason), and the build
    lock files of templates that are gone (its own included)."""
    layers_dir = emu_dir / "layers"
    with layers.caches_lock(emu_dir, exclusive=True) as taken:
        if not taken:
            raise errors.BackendError(f"{NAME}: {BUILDING}")
        try:
            now = {c.id: c for c in listing(emu_dir, live, locked=True)}.get(cache.id)
            if now is None or now.path != cache.path:
                return  # already gone
            if now.held:
                raise errors.BackendError(f"{NAME}: {cache.kind} {cache.id} is in use: {now.held}")
            path = Path(now.path)
            if _real(path.parent) not in (_real(layers_dir), _real(emu_dir / "images")):
                raise errors.BackendError(f"{NAME}: refusing to remove {path}: not under {emu_dir}")
            userns.rmtree(path)
            if path.exists():
                raise errors.BackendError(f"{NAME}: could not remove all of {path}")
        finally:
            _prune(emu_dir)
