"""``vmenv images``: what is cached between sessions, with sizes (and ``rm``, ``build``)."""

from __future__ import annotations

import argparse
import sys

from ..caches import human_size
from ..paths import state_dir
from ..reaper import close_backends
from .backends import age
from .building import images_build
from .listing import cache_backends, caches
from .removal import images_rm

__all__ = ["cmd_images"]


def cmd_images(args: argparse.Namespace) -> int:
    state = state_dir()
    if args.action == "rm":
        return images_rm(args, state)
    if args.action == "build":
        return images_build(args, state)
    if args.keys or args.all:
        print("vmenv images: ID... and --all go with rm: vmenv images rm ID...", file=sys.stderr)
        return 2
    backends = cache_backends()
    try:
        found = caches(state, backends)
    finally:
        close_backends(backends.made)
    if not found:
        print(f"no cached images in {state}")
        return 0
    rows = [
        (
            c.kind,
            c.backend or "-",
            human_size(c.size),
            age(c.created),
            c.id,
            c.detail
            if c.kind == "other files"
            else c.detail + (f"; in use: {c.held}" if c.held else ""),
        )
        for c in found
    ]
    header = ("KIND", "BACKEND", "SIZE", "AGE", "ID", "DETAIL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print(
            f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
            f"{row[3]:>{widths[3]}}  {row[4]:<{widths[4]}}  {row[5]}"
        )
    total = sum(c.size or 0 for c in found)
    held = sum(1 for c in found if c.held)
    note = f"; {held} in use or not ours to remove (vmenv images rm leaves them)" if held else ""
    print(f"total {human_size(total)} in {state}{note}")
    return 0
