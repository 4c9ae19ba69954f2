"""What ``vmenv images`` lists: every cache in the state dir, as the backends see it now."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..backend import Backend, Cache, CacheKeeper, TemplateLister
from ..caches import image_caches, live_sessions, other_files, scratch_caches, template_caches
from ..errors import VmenvError
from ..reaper import close_backends
from ..registry import SHIPPED, Registry
from .backends import made, reason

__all__ = ["CacheBackends", "cache_backends", "caches"]


@dataclass
class CacheBackends:
    """The backends ``vmenv images`` lists caches with, each made (and checked) once per
    command: ``made`` to close at the end, ``why`` a backend lists nothing (by name),
    ``names`` every backend name whose files under the state dir are counted."""

    made: list[Backend] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)


def cache_backends() -> CacheBackends:
    """Every installed backend that can list its caches here: a :class:`CacheKeeper` as it
    is (it lists what it keeps without its hypervisor), a :class:`TemplateLister` once its
    ``check()`` passes."""
    found = CacheBackends(names=set(Registry()) | set(SHIPPED))
    for name, backend in made():
        if isinstance(backend, str):
            found.why[name] = backend
            continue
        if not isinstance(backend, CacheKeeper):
            try:
                backend.check()
            except VmenvError as exc:
                found.why[backend.name] = reason(exc)
                close_backends([backend])
                continue
        found.made.append(backend)
    return found


def caches(state: Path, backends: CacheBackends) -> list[Cache]:
    """Every cache in ``state`` (see :mod:`.caches`), as ``backends`` list them now."""
    live = live_sessions(state)
    found = scratch_caches(state, live)
    listed: set[str] = set()  # backends whose every cache is listed
    why = dict(backends.why)
    for backend in backends.made:
        try:
            if isinstance(backend, CacheKeeper):
                found += backend.caches(live)
                listed.add(backend.name)
                continue
            snaps = backend.templates() if isinstance(backend, TemplateLister) else []
            found += template_caches(backend, snaps, live)
            why[backend.name] = "files the backend does not list as caches"
        except VmenvError as exc:
            why[backend.name] = reason(exc)
    found += image_caches(state, found)
    for name in sorted(backends.names - listed):
        because = why.get(name) or "its backend is not installed here"
        row = other_files(state, name, [c for c in found if c.backend == name], because)
        if row is not None:
            found.append(row)
    return found
