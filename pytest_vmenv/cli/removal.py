"""``vmenv images rm ID...|--all``: remove caches that nothing live uses.

Removal goes in rounds, snapshots before templates before images, because removing one can
free what was stacked under it; whatever is left is said, with why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..backend import Backend, Cache, CacheKeeper, Snapshot
from ..caches import human_size, live_sessions, remove_image, remove_scratch
from ..errors import TemplateInUse, VmenvError
from ..images import BuiltImage
from ..reaper import close_backends
from .listing import CacheBackends, cache_backends, caches

__all__ = ["images_rm"]


_REMOVAL_ORDER = ("snapshot", "torn build", "template", "scratch", "torn image build", "image")


def _remove(cache: Cache, backends: Sequence[Backend], state: Path) -> None:
    if not cache.backend:
        if cache.kind == "scratch":
            remove_scratch(state, cache)
        else:
            remove_image(state, cache)
        return
    backend = next(b for b in backends if b.name == cache.backend)
    if isinstance(backend, CacheKeeper):
        backend.remove_cache(cache, live_sessions(state))
    elif isinstance(cache.handle, Snapshot):
        backend.remove_template(cache.handle)


def _what(cache: Cache) -> str:
    """``tarball image ID``; a kind the id already names once (``scratch/NAME``)."""
    return cache.id if cache.id.startswith(f"{cache.kind}/") else f"{cache.kind} {cache.id}"


def _spared_by_all(cache: Cache) -> str:
    """Why ``--all`` leaves ``cache`` unless it is named, or '' if ``--all`` takes it."""
    if isinstance(cache.handle, Snapshot) and cache.handle.reuse:
        return "reusable (--vm-reuse); name it to remove it"
    if cache.size is None:
        return "not on this host (sessions elsewhere may use it); name it to remove it"
    return ""


def _key(cache: Cache) -> str | None:
    """The key of a template's or a built image's cache (None for any other)."""
    return cache.handle.key if isinstance(cache.handle, Snapshot | BuiltImage) else None


def _pick(caches: Sequence[Cache], wanted: Sequence[str]) -> tuple[set[str], list[str]]:
    """(ids of the caches named by ``wanted``: an id, a template key or a unique prefix of an
    id; errors for names that match none or several)."""
    picked: set[str] = set()
    problems = []
    for name in wanted:
        exact = [c for c in caches if name in (c.id, _key(c)) and c.kind != "other files"]
        matches = exact or [c for c in caches if c.id.startswith(name) and c.kind != "other files"]
        if len(matches) == 1:
            picked.add(matches[0].id)
        elif not matches:
            problems.append(f"no cache {name!r}; `vmenv images` lists them")
        else:
            problems.append(
                f"{name!r} names {len(matches)} caches ({', '.join(c.id for c in matches)}); "
                "give more of the id"
            )
    return picked, problems


_RM_USAGE = (
    "vmenv images rm: name what to remove: IDs from `vmenv images` (or a template key, or a "
    "unique prefix of an id), or --all for every cache that nothing live uses (--all leaves "
    "--vm-reuse templates and templates not on this host unless they are named too); "
    "nothing was removed"
)


def images_rm(args: argparse.Namespace, state: Path) -> int:
    if not args.keys and not args.all:
        print(_RM_USAGE, file=sys.stderr)
        return 2
    backends = cache_backends()
    try:
        return _remove_caches(args, state, backends)
    finally:
        close_backends(backends.made)


class _Removal:
    """What one ``vmenv images rm`` removed, failed to remove (not retried) and found in use
    when it tried (a backend's own check)."""

    def __init__(self, state: Path, backends: CacheBackends) -> None:
        self.state = state
        self.backends = backends
        self.freed = 0
        self.removed: set[str] = set()
        self.failed: set[str] = set()
        self.busy: set[str] = set()

    def new(self, cache: Cache) -> bool:
        """Whether ``cache`` was not tried yet."""
        return cache.id not in self.removed | self.failed | self.busy

    def remove(self, cache: Cache) -> None:
        """Remove ``cache``, printing what happened."""
        try:
            _remove(cache, self.backends.made, self.state)
        except TemplateInUse as exc:
            print(f"left {_what(cache)}: in use: {exc.holder}")
            self.busy.add(cache.id)
            return
        except (VmenvError, OSError) as exc:
            print(f"error: {_what(cache)}: {exc}", file=sys.stderr)
            self.failed.add(cache.id)
            return
        self.removed.add(cache.id)
        self.freed += cache.size or 0
        where = f"{cache.backend} " if cache.backend else ""
        print(f"removed {where}{_what(cache)} ({human_size(cache.size)})")


def _remove_caches(args: argparse.Namespace, state: Path, backends: CacheBackends) -> int:
    named, problems = _pick(caches(state, backends), args.keys)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)

    def chosen(cache: Cache) -> bool:
        if cache.kind == "other files":
            return False
        return cache.id in named or (args.all and not _spared_by_all(cache))

    removal = _Removal(state, backends)
    for _round in range(len(_REMOVAL_ORDER) + 2):  # a removal can free what stacked under it
        todo = [c for c in caches(state, backends) if chosen(c) and not c.held and removal.new(c)]
        todo.sort(key=lambda c: _REMOVAL_ORDER.index(c.kind) if c.kind in _REMOVAL_ORDER else 9)
        for cache in todo:
            removal.remove(cache)
        if not todo:
            break
    removed, failed, busy = removal.removed, removal.failed, removal.busy
    left = [
        c
        for c in caches(state, backends)
        if c.id not in removed | failed | busy
        and (c.id in named or (args.all and (c.held or _spared_by_all(c))))
    ]
    for cache in left:
        if cache.kind == "other files":
            print(f"left {cache.path} ({human_size(cache.size)}): {cache.held}")
        elif cache.held:
            print(f"left {_what(cache)}: in use: {cache.held}")
        else:
            print(f"left {_what(cache)}: {_spared_by_all(cache)}")
    if removed:
        print(f"freed {human_size(removal.freed)}")
    elif not left and not busy and not failed:
        print(f"no cached images in {state}")
    in_use = bool(busy & named) or any(c.id in named for c in left)
    return 1 if problems or failed or in_use else 0
