"""``vmenv ls``, ``vmenv gc`` and ``vmenv shell``: the machines of every session here."""

from __future__ import annotations

import argparse
import re
import sys

from ..backend import MachineRef, Shell
from ..ledger import file_lock
from ..owners import owner_alive
from ..paths import state_dir
from ..reaper import close_backends, sweep
from .backends import age, usable

__all__ = ["cmd_gc", "cmd_ls", "cmd_shell", "duration"]


def _state(ref: MachineRef) -> str:
    if ref.kept:
        return "kept"
    if ref.owner and not owner_alive(ref.owner):
        return "orphaned"
    return str(ref.data.get("state", "running"))


def cmd_ls(args: argparse.Namespace) -> int:
    backends = usable()
    rows = [(b, ref) for b in backends for ref in b.owned(None)]
    if not rows:
        print("no machines")
    else:
        print(f"{'ID':<24} {'NAME':<12} {'BACKEND':<9} {'SESSION':<22} {'AGE':>5} STATE")
        for backend, ref in rows:
            print(
                f"{ref.id:<24} {ref.name:<12} {backend.name:<9} {ref.session:<22} "
                f"{age(ref.created):>5} {_state(ref)}"
            )
    close_backends(backends)
    return 0


_DURATION = re.compile(r"^(\d+)([smhd])$")


def duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 1h or 2d")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def cmd_gc(args: argparse.Namespace) -> int:
    backends = usable()
    try:
        with file_lock(state_dir(), "sweep"):
            report = sweep(backends, state_dir(), include_kept=args.all, older_than=args.older_than)
    finally:
        close_backends(backends)
    for line in report.removed:
        print(f"removed {line}")
    for line in report.left:
        print(f"left {line}")
    for line in report.errors:
        print(f"error: {line}", file=sys.stderr)
    if not report.removed and not report.errors and not report.left:
        print("nothing to remove")
    return 1 if report.errors else 0


def cmd_shell(args: argparse.Namespace) -> int:
    backends = usable()
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
        if not isinstance(backend, Shell):
            print(f"vmenv shell: the {backend.name} backend offers no shell", file=sys.stderr)
            return 1
        return backend.shell(ref, args.command or None)
    finally:
        close_backends(backends)
