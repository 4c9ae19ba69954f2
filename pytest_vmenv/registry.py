"""Find backends through the ``pytest_vmenv.backends`` entry-point group, lazily.

Each entry point is ``NAME = "module:Class"``; the built-in emulator is registered exactly the
same way, so the path a third-party backend takes is always exercised. Nothing is imported
until a backend is used (a libvirt or vSphere import is costly, and may be missing): an import
failure becomes :class:`BackendUnavailable` with an install hint.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .backend import BuiltinImages
from .errors import BackendUnavailable, ConfigError
from .shipped import SHIPPED, install_hint, not_installed

__all__ = ["GROUP", "SHIPPED", "Registry", "not_installed"]

GROUP = "pytest_vmenv.backends"


class Registry(Mapping[str, Sequence[str]]):
    """Installed backends by name; ``registry[name]`` is the images that backend provides."""

    def __init__(self, eps: Sequence[EntryPoint] | None = None) -> None:
        found = entry_points(group=GROUP) if eps is None else eps
        self._eps = {ep.name: ep for ep in found}
        self._classes: dict[str, type[Any]] = {}
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._eps))

    def __len__(self) -> int:
        return len(self._eps)

    def __getitem__(self, name: str) -> Sequence[str]:
        if name not in self._eps:
            raise KeyError(name)
        try:
            cls = self.load(name)
        except BackendUnavailable:
            return ()
        return tuple(cls.builtin_images) if isinstance(cls, BuiltinImages) else ()

    def load(self, name: str) -> type[Any]:
        """Import and return the backend class registered as ``name``."""
        with self._lock:
            if name in self._classes:
                return self._classes[name]
            ep = self._eps.get(name)
            if ep is None:
                raise ConfigError(f"backend {name!r} {not_installed(name, self)}")
            try:
                cls: type[Any] = ep.load()
            except ImportError as exc:
                hint = install_hint(name) or f"install the distribution that provides {ep.value}"
                raise BackendUnavailable(
                    name, f"cannot import {ep.value}: {exc} ({hint})"
                ) from None
            self._classes[name] = cls
            return cls
