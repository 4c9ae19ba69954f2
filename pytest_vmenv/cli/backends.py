"""The installed backends as a ``vmenv`` command makes them, and ``vmenv backends``.

Each is made with its options from ``vmenv.toml`` here, else those the ledger recorded (so
``vmenv gc`` reaches what a session elsewhere made); :func:`checked` also runs its ``check()``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..backend import Backend, SpecCheck
from ..config import load_config
from ..errors import BackendUnavailable, ConfigError, VmenvError
from ..ledger import owners
from ..paths import state_dir
from ..reaper import close_backends
from ..registry import Registry

__all__ = ["age", "checked", "cmd_backends", "made", "reason", "usable"]


def _options() -> dict[str, Mapping[str, Any]]:
    """Backend options: vmenv.toml of the current directory, else what the ledger recorded."""
    found: dict[str, Mapping[str, Any]] = {}
    for record in owners(state_dir()):
        for name, options in record.backends.items():
            found.setdefault(name, options)
    try:
        found.update(load_config(Path.cwd()).backends)
    except ConfigError as exc:
        print(f"vmenv: ignoring vmenv.toml here: {exc}", file=sys.stderr)
    return found


def _options_of(name: str, cls: type[Any], options: Mapping[str, Mapping[str, Any]]) -> Any:
    """The options of backend ``name``; an alias (``kvm``) falls back to its class's name's
    (``libvirt``: the table users write, and the name the ledger records them under)."""
    return options.get(name) or options.get(str(getattr(cls, "name", name)), {})


def made() -> Iterator[tuple[str, Backend | str]]:
    """(name, backend) for each installed backend, made with its options but not checked,
    or (name, reason) when it cannot be made; an alias (``kvm`` of ``libvirt``) once."""
    registry = Registry()
    options = _options()
    seen: set[type[Any]] = set()
    for name in registry:
        try:
            cls = registry.load(name)
            if cls in seen:
                continue
            seen.add(cls)
            backend: Backend = cls(_options_of(name, cls, options))
        except (BackendUnavailable, ConfigError) as exc:
            yield name, reason(exc)
            continue
        yield name, backend


def reason(exc: VmenvError) -> str:
    return exc.reason if isinstance(exc, BackendUnavailable) else str(exc)


def checked() -> Iterator[tuple[str, Backend | str]]:
    """(name, backend) for each installed backend, or (name, reason) when it cannot run."""
    for name, backend in made():
        if not isinstance(backend, str):
            try:
                backend.check()
            except (BackendUnavailable, ConfigError) as exc:
                close_backends([backend])
                yield name, reason(exc)
                continue
        yield name, backend


def usable() -> list[Backend]:
    return [b for _, b in checked() if not isinstance(b, str)]


def cmd_backends(args: argparse.Namespace) -> int:
    rows = list(checked())
    if not rows:
        print("no backend is installed (reinstall pytest-vmenv: the emulator is built in)")
        return 1
    for name, backend in rows:
        if isinstance(backend, str):
            state = f"unavailable: {backend}"
        else:
            limits = backend.restrictions() if isinstance(backend, SpecCheck) else None
            state = f"usable ({limits})" if limits else "usable"
        print(f"{name:<10} {state}")
    close_backends(b for _, b in rows if not isinstance(b, str))
    return 0


def age(created: float) -> str:
    seconds = max(0, int(time.time() - created)) if created else 0
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
