"""The ``vmenv`` command (also ``python -m pytest_vmenv``).

``vmenv backends``   installed backends, whether each can run here, and if not why
``vmenv ls``         live and kept machines: backend, session, age, state
``vmenv gc``         destroy what dead sessions left (``--all``: kept machines too)
``vmenv images``     what is cached between sessions, with sizes (``vmenv images rm ID...|--all``;
                     ``vmenv images build NAME`` builds a Debian image ahead, for CI caches;
                     ``--backend libvirt`` builds the qcow2 that backend boots, too)
``vmenv shell ID``   an interactive shell in a machine (a kept one, typically)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..images import INITS
from .backends import cmd_backends
from .images import cmd_images
from .machines import cmd_gc, cmd_ls, cmd_shell, duration

__all__ = ["main"]


def _images_arguments(images: argparse.ArgumentParser) -> None:
    images.add_argument("action", nargs="?", choices=["ls", "rm", "build"], default="ls")
    images.add_argument(
        "keys",
        nargs="*",
        metavar="ID",
        help="with rm: ids (or prefixes) to remove; with build: the image NAME (debian-12, or "
        "an [images.NAME] recipe of vmenv.toml here)",
    )
    images.add_argument(
        "--all",
        action="store_true",
        help="with rm: every cache nothing live uses, but --vm-reuse templates and templates "
        "not on this host (name those to remove them)",
    )
    images.add_argument(
        "--packages", default="", metavar="A,B", help="with build: packages to add to the recipe"
    )
    images.add_argument(
        "--init", default="systemd", choices=INITS, help="with build: the init (default systemd)"
    )
    images.add_argument(
        "--backend",
        default="",
        metavar="NAME",
        help="with build: that backend's own image of the recipe (libvirt: the qcow2 it "
        "boots), not only the tree every backend starts from",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmenv", description="pytest-vmenv machines")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("backends", help="installed backends, and whether they can run here")
    sub.add_parser("ls", help="live and kept machines")
    gc = sub.add_parser("gc", help="destroy what dead sessions left")
    gc.add_argument("--all", action="store_true", help="kept machines too")
    gc.add_argument("--older-than", type=duration, metavar="AGE", help="e.g. 30m, 1h, 2d")
    images = sub.add_parser(
        "images",
        help="what is cached between sessions (templates, unpacked images...), with sizes",
        description="List the caches in the state dir; `rm ID...` removes those named, "
        "`rm --all` every one, that no live session or machine uses; `build NAME` builds a "
        "Debian image (for CI caches: the state dir then holds it).",
    )
    _images_arguments(images)
    shell = sub.add_parser("shell", help="a shell in a machine")
    shell.add_argument("machine", metavar="ID", help="a machine's id (or unique name)")
    shell.add_argument("command", nargs="*", help="a command instead of the login shell")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb == "images" and not any(e.startswith("-") for e in extra):
        args.keys += extra  # IDs after --all (`rm --all ID`): argparse leaves them over
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
