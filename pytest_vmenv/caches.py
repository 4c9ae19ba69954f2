"""Everything pytest-vmenv keeps on disk between sessions, for ``vmenv images``.

A backend that implements :class:`~pytest_vmenv.backend.CacheKeeper` lists (and removes) its
own caches; for one that only lists ``templates()``, each template is a cache here, held
while its session runs (a ``--vm-reuse`` one while any session runs: it may be reusing it).
The plugin's own caches are the scratch dirs of sessions (``<state>/scratch``; a running
session's stay, and so do bare ``put-``/``get-`` transfer files, see :func:`scratch_held`) and
the images built from a distribution's archive (``<state>/images``, see :mod:`.images`), each
held while a template or snapshot of any backend stacks on it or while it is being built.
Files under ``<state>/<backend>`` that no listing accounts for (a backend not installed or
not usable here, or one that lists templates only) are one "other files" row each: counted,
never removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Collection, Iterable
from pathlib import Path

from .backend import Backend, Cache, Snapshot
from .ledger import owners

__all__ = [
    "MACHINE_TEMP",
    "disk_usage",
    "human_size",
    "image_caches",
    "live_sessions",
    "other_files",
    "remove_image",
    "remove_scratch",
    "scratch_caches",
    "scratch_held",
    "template_caches",
]


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def disk_usage(path: Path | str, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes ``path`` takes on disk (as ``du``): symlinks not followed, hard links once.

    ``seen`` (device, inode) pairs are shared across calls: what one call counted (or what
    was put there first) another does not count again.
    """
    return _usage(path, set() if seen is None else seen)[0]


def _usage(path: Path | str, seen: set[tuple[int, int]]) -> tuple[int, int]:
    """(bytes on disk, how many non-directories) under ``path``, skipping ``seen`` inodes."""
    total = files = 0
    try:
        st = os.lstat(path)
    except OSError:
        return 0, 0
    stack = [(str(path), st)]
    while stack:
        current, st = stack.pop()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if not stat.S_ISDIR(st.st_mode):
            files += 1
            continue
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        stack.append((entry.path, entry.stat(follow_symlinks=False)))
        except OSError:
            continue
    return total, files


def human_size(size: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; None (not stored on this host) -> ``-``."""
    if size is None:
        return "-"
    value = float(size)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def live_sessions(state_dir: Path) -> set[str]:
    """Ids of the sessions that have a running process (from the ledger)."""
    return {r.session for r in owners(state_dir) if r.alive}


def _session_of(name: str, live: Collection[str]) -> str | None:
    return next((s for s in live if name.startswith(f"{s}-")), None)


MACHINE_TEMP = ("put-", "get-")
"""Prefixes of a Machine's transfer files made straight in ``<state>/scratch`` (one made
without a session's scratch dir): whose they are, and whether a put or get is using one
right now, cannot be told."""


def scratch_held(name: str, live: Collection[str]) -> str:
    """Why the entry ``name`` of ``<state>/scratch`` must stay, or '' if it may go.

    The one rule for ``vmenv images rm`` and the sweeps: a running session's dir stays, and
    so does a Machine's transfer file outside any session's dir (:data:`MACHINE_TEMP`).
    """
    if name.startswith(MACHINE_TEMP):
        return "a machine's transfer file outside any session's dir (a put or get may be using it)"
    session = _session_of(name, live)
    return f"session {session} is running" if session else ""


def scratch_caches(state_dir: Path, live: Collection[str]) -> list[Cache]:
    """What ``<state>/scratch`` holds: sessions' dirs (``<session>-<worker>``) and Machines'
    transfer files, each held by :func:`scratch_held`."""
    root = state_dir / "scratch"
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        try:
            created = path.lstat().st_mtime
        except OSError:
            continue
        temp = path.name.startswith(MACHINE_TEMP)
        found.append(
            Cache(
                backend="",
                kind="scratch",
                id=f"scratch/{path.name}",
                size=disk_usage(path),
                path=str(path),
                detail="a machine's put or get"
                if temp
                else "files a session's machines copied in and out",
                created=created,
                held=scratch_held(path.name, live),
            )
        )
    return found


def remove_scratch(state_dir: Path, cache: Cache) -> None:
    """Remove a scratch entry (a dir with what is in it, a file or a link: unlinked), unless
    :func:`scratch_held` holds it now (OSError with the reason)."""
    path = Path(cache.path)
    root = state_dir / "scratch"
    if os.path.realpath(path.parent) != os.path.realpath(root):
        raise OSError(f"refusing to remove {path}: not in {root}")
    held = scratch_held(path.name, live_sessions(state_dir))
    if held:
        raise OSError(held)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def image_caches(state_dir: Path, listed: Iterable[Cache]) -> list[Cache]:
    """The built images (and image builds) in ``<state>/images``; one is held while a
    template or snapshot in ``listed`` stacks on it, or while it is being built."""
    from .images import ImageCache

    users: dict[str, str] = {}
    for cache in listed:
        if isinstance(cache.handle, Snapshot):
            for entry in cache.handle.data.get("layers") or ():
                who = f"{cache.backend} {cache.kind} {cache.id} stacks on it"
                users.setdefault(os.path.realpath(str(entry)), who)
    found = []
    for image in ImageCache(state_dir).listing():
        root = os.path.realpath(image.path) + os.sep
        held = next((who for path, who in users.items() if path.startswith(root)), "")
        if image.building:
            held = "it is being built"
        found.append(
            Cache(
                backend="",
                kind="image" if image.complete else "torn image build",
                id=f"images/{image.key if image.complete else image.path.name}",
                size=disk_usage(image.path),
                path=str(image.path),
                detail=f"{image.describe()}, built with mmdebstrap"
                if image.complete
                else f"a build of {image.describe()} that did not finish",
                created=image.created,
                held=held,
                handle=image,
            )
        )
    return found


def remove_image(state_dir: Path, cache: Cache) -> None:
    """Remove a built image (or a torn build); BackendError if it is being built."""
    from .images import BuiltImage, ImageCache

    if isinstance(cache.handle, BuiltImage):
        ImageCache(state_dir).remove(cache.handle)


def template_caches(
    backend: Backend, snaps: Iterable[Snapshot], live: Collection[str]
) -> list[Cache]:
    """The templates of a backend that lists nothing but ``templates()``."""
    found = []
    for snap in snaps:
        session, reuse = snap.session, snap.reuse
        held = ""
        if session in live:
            held = f"session {session} is running"
        elif reuse and live:
            held = "a running session may be reusing it (--vm-reuse)"
        path = snap.handle if os.path.isabs(snap.handle) else ""
        found.append(
            Cache(
                backend=backend.name,
                kind="template" if snap.complete else "torn build",
                id=snap.key or snap.handle,
                size=disk_usage(path) if path and os.path.exists(path) else None,
                path=path,
                detail=("reusable (--vm-reuse)" if reuse else f"session {session or '?'}")
                + (f"; machine {snap.name}" if snap.name else ""),
                created=snap.created,
                held=held,
                handle=snap,
            )
        )
    return found


def other_files(state_dir: Path, name: str, listed: Iterable[Cache], why: str) -> Cache | None:
    """What ``<state>/<name>`` holds beyond the caches ``listed`` for it (counted, kept);
    None when that is nothing but empty dirs."""
    root = state_dir / name
    if not root.is_dir():
        return None
    seen: set[tuple[int, int]] = set()
    for cache in listed:
        if cache.path:
            disk_usage(cache.path, seen)
    size, files = _usage(root, seen)
    if not files:
        return None
    return Cache(
        backend=name,
        kind="other files",
        id=f"{name}/",
        size=size,
        path=str(root),
        detail=why,
        created=root.stat().st_mtime,
        held=why,
    )
