"""The ``vmenv`` command (also ``python -m pytest_vmenv``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import BackendUnavailable, ConfigError
from .registry import Registry

__all__ = ["main"]


def _backends(args: argparse.Namespace) -> int:
    registry = Registry()
    if not len(registry):
        print("no backend is installed (reinstall pytest-vmenv: the emulator is built in)")
        return 1
    for name in registry:
        try:
            backend = registry.load(name)({})
            backend.check()
        except (BackendUnavailable, ConfigError) as exc:
            reason = exc.reason if isinstance(exc, BackendUnavailable) else str(exc)
            print(f"{name:<10} unavailable: {reason}")
        else:
            print(f"{name:<10} usable")
            close = getattr(backend, "close", None)
            if callable(close):
                close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmenv", description="pytest-vmenv machines and backends")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "backends", help="installed backends, and whether they can run here"
    ).set_defaults(func=_backends)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
