"""``vmenv images build NAME [--backend B]``: build a Debian image ahead (for CI caches).

Without ``--backend`` it builds the tree every backend starts from (:mod:`..images`); with
it, also that backend's own image of the recipe (an :class:`~..backend.ImageBuilder`: the
libvirt backend's bootable qcow2), as its machines would on first use.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..backend import ImageBuilder
from ..config import load_config
from ..errors import ConfigError, VmenvError
from ..images import (
    BASES,
    BuildEvent,
    ImageCache,
    LinePrinter,
    Recipe,
    builder_problem,
    check_packages,
    subscribe,
)
from ..reaper import close_backends
from ..registry import Registry
from .backends import made

__all__ = ["images_build", "named_recipe"]


def named_recipe(name: str, packages: str, init: str) -> Recipe:
    """The recipe named ``NAME`` here, as ``vmenv images build NAME`` (and the libvirt export)
    build it: a built-in base or an [images.NAME] recipe of the config in the working dir."""
    config = load_config(Path.cwd())
    entry = config.images.get(name)
    if entry is not None:
        base = entry.get("base")
        if not isinstance(base, str):
            raise ConfigError(
                f"{config.where}: images.{name} is not a recipe (no base = ...); only images "
                "built from the Debian archive are built ahead"
            )
        listed = list(entry.get("packages") or ())
    elif name in BASES:
        base, listed = name, []
    else:
        recipes = [n for n, e in config.images.items() if "base" in e]
        raise ConfigError(
            f"no image {name!r} to build. Choose one of: {', '.join([*BASES, *recipes])} "
            f"(built-in, or [images.NAME] with base = ... in {config.where})"
        )
    extra = check_packages([p for p in packages.split(",") if p], "--packages")
    return Recipe(base, (*listed, *extra), init)


def images_build(args: argparse.Namespace, state: Path) -> int:
    if len(args.keys) != 1:
        print("vmenv images build: give one image NAME (e.g. debian-12)", file=sys.stderr)
        return 2
    try:
        recipe = named_recipe(args.keys[0], args.packages, args.init)
    except ConfigError as exc:
        print(f"vmenv images build: {exc}", file=sys.stderr)
        return 2
    if args.backend:
        return _backend_build(args.backend, recipe)
    cache = ImageCache(state)
    try:
        found = cache.lookup(recipe)
        if found is None:
            problem = builder_problem()
            if problem is not None:
                print(f"vmenv images build: {problem}", file=sys.stderr)
                return 1
            status = _status_line if sys.stderr.isatty() else None
            unsubscribe = subscribe(LinePrinter(_stderr_line, status))
            try:
                found = cache.ensure(recipe)
            finally:
                unsubscribe()
        else:
            print(f"image {recipe.describe()} is built already", file=sys.stderr)
    except VmenvError as exc:
        print(f"vmenv images build: {exc}", file=sys.stderr)
        return 1
    print(f"images/{found.parent.name}  {found}")
    return 0


def _backend_build(name: str, recipe: Recipe) -> int:
    """``--backend NAME``: that backend's image of ``recipe`` (:class:`ImageBuilder`)."""
    backends = dict(made())  # an alias (kvm) once: its backend answers to its own name too
    backend = backends.get(name) or next(
        (b for b in backends.values() if not isinstance(b, str) and b.name == name), None
    )
    if backend is None:
        print(
            f"vmenv images build: no backend {name!r} here; installed: {', '.join(Registry())}",
            file=sys.stderr,
        )
        return 2
    try:
        if isinstance(backend, str):
            print(f"vmenv images build: backend {name}: {backend}", file=sys.stderr)
            return 1
        if not isinstance(backend, ImageBuilder):
            print(
                f"vmenv images build: backend {name} builds no image of its own: it starts "
                "from the tree, which `vmenv images build NAME` builds (without --backend)",
                file=sys.stderr,
            )
            return 2
        status = _status_line if sys.stderr.isatty() else None
        unsubscribe = subscribe(LinePrinter(_stderr_line, status))
        try:
            ident, path = backend.build_image(recipe)
        except VmenvError as exc:
            print(f"vmenv images build: {exc}", file=sys.stderr)
            return 1
        finally:
            unsubscribe()
    finally:
        close_backends([b for b in backends.values() if not isinstance(b, str)])
    print(f"{ident}  {path}")
    return 0


def _stderr_line(text: str) -> None:
    end = "\n" if not sys.stderr.isatty() else "\x1b[K\n"
    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + text + end)
    sys.stderr.flush()


def _status_line(event: BuildEvent) -> None:
    width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be rewritten
    sys.stderr.write("\r" + event.status(width) + "\x1b[K")
    sys.stderr.flush()
