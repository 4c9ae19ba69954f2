"""The ``vmenv`` command (also ``python -m pytest_vmenv``).

``vmenv backends``   installed backends, whether each can run here, and if not why
``vmenv ls``         live and kept machines: backend, session, age, state
``vmenv gc``         destroy what dead sessions left (``--all``: kept machines too)
``vmenv images``     cached templates (``vmenv images rm KEY...|--all``)
``vmenv shell ID``   an interactive shell in a machine (a kept one, typically)
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .backend import Backend, MachineRef, SpecCheck, owner_alive
from .config import load_config
from .errors import BackendUnavailable, ConfigError, VmenvError
from .ledger import file_lock, owners
from .paths import state_dir
from .reaper import close_backends, sweep
from .registry import Registry

__all__ = ["main"]


def _options(registry: Registry) -> dict[str, Mapping[str, Any]]:
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


def _backends(quiet: bool = True) -> Iterator[tuple[str, Backend | str]]:
    """(name, backend) for each installed backend, or (name, reason) when it cannot run."""
    registry = Registry()
    options = _options(registry)
    seen: set[type[Any]] = set()
    for name in registry:
        try:
            cls = registry.load(name)
            if cls in seen:
                continue  # an alias (kvm -> libvirt)
            seen.add(cls)
            backend: Backend = cls(options.get(name, {}))
            backend.check()
        except (BackendUnavailable, ConfigError) as exc:
            yield name, exc.reason if isinstance(exc, BackendUnavailable) else str(exc)
            continue
        yield name, backend


def _usable() -> list[Backend]:
    return [b for _, b in _backends() if not isinstance(b, str)]


def cmd_backends(args: argparse.Namespace) -> int:
    rows = list(_backends())
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


def _age(created: float) -> str:
    seconds = max(0, int(time.time() - created)) if created else 0
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _state(ref: MachineRef) -> str:
    if ref.kept:
        return "kept"
    if ref.owner and not owner_alive(ref.owner):
        return "orphaned"
    return str(ref.data.get("state", "running"))


def cmd_ls(args: argparse.Namespace) -> int:
    backends = _usable()
    rows = [(b, ref) for b in backends for ref in b.owned(None)]
    if not rows:
        print("no machines")
    else:
        print(f"{'ID':<24} {'NAME':<12} {'BACKEND':<9} {'SESSION':<22} {'AGE':>5} STATE")
        for backend, ref in rows:
            print(
                f"{ref.id:<24} {ref.name:<12} {backend.name:<9} {ref.session:<22} "
                f"{_age(ref.created):>5} {_state(ref)}"
            )
    close_backends(backends)
    return 0


_DURATION = re.compile(r"^(\d+)([smhd])$")


def _seconds(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 1h or 2d")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def cmd_gc(args: argparse.Namespace) -> int:
    backends = _usable()
    try:
        with file_lock(state_dir(), "sweep"):
            report = sweep(backends, state_dir(), include_kept=args.all, older_than=args.older_than)
    finally:
        close_backends(backends)
    for line in report.removed:
        print(f"removed {line}")
    for line in report.errors:
        print(f"error: {line}", file=sys.stderr)
    if not report.removed and not report.errors:
        print("nothing to remove")
    return 1 if report.errors else 0


def cmd_images(args: argparse.Namespace) -> int:
    backends = _usable()
    status = 0
    try:
        for backend in backends:
            list_templates = getattr(backend, "templates", None)
            if not callable(list_templates):
                continue
            for snap in list_templates():
                if args.action == "rm":
                    if args.all or snap.key in args.keys:
                        backend.remove_template(snap)
                        print(f"removed {backend.name} template {snap.key}")
                    continue
                session = snap.data.get("session") or "(reusable)"
                print(f"{snap.key:<44} {backend.name:<9} {session:<22} "
                      f"{_age(float(snap.data.get('created', 0))):>5}")  # fmt: skip
    except VmenvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        close_backends(backends)
    return status


def cmd_shell(args: argparse.Namespace) -> int:
    backends = _usable()
    try:
        matches = [
            (b, ref)
            for b in backends
            for ref in b.owned(None)
            if args.machine in (ref.id, ref.name)
        ]
        if len(matches) != 1:
            what = "no machine" if not matches else f"{len(matches)} machines"
            print(
                f"vmenv shell: {what} named {args.machine!r}; `vmenv ls` lists machines by ID",
                file=sys.stderr,
            )
            return 1
        backend, ref = matches[0]
        shell = getattr(backend, "shell", None)
        if not callable(shell):
            print(f"vmenv shell: the {backend.name} backend offers no shell", file=sys.stderr)
            return 1
        code: int = shell(ref, args.command or None)
        return code
    finally:
        close_backends(backends)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmenv", description="pytest-vmenv machines")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("backends", help="installed backends, and whether they can run here")
    sub.add_parser("ls", help="live and kept machines")
    gc = sub.add_parser("gc", help="destroy what dead sessions left")
    gc.add_argument("--all", action="store_true", help="kept machines too")
    gc.add_argument("--older-than", type=_seconds, metavar="AGE", help="e.g. 30m, 1h, 2d")
    images = sub.add_parser("images", help="cached templates")
    images.add_argument("action", nargs="?", choices=["ls", "rm"], default="ls")
    images.add_argument("keys", nargs="*", metavar="KEY")
    images.add_argument("--all", action="store_true", help="with rm: every template")
    shell = sub.add_parser("shell", help="a shell in a machine")
    shell.add_argument("machine", metavar="ID", help="a machine's id (or unique name)")
    shell.add_argument("command", nargs="*", help="a command instead of the login shell")
    args = parser.parse_args(argv)
    handler = {
        "backends": cmd_backends,
        "ls": cmd_ls,
        "gc": cmd_gc,
        "images": cmd_images,
        "shell": cmd_shell,
    }[args.verb]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
