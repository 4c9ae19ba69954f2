"""The ``vmenv`` command (also ``python -m pytest_vmenv``).

``vmenv backends``   installed backends, whether each can run here, and if not why
``vmenv ls``         live and kept machines: backend, session, age, state
``vmenv gc``         destroy what dead sessions left (``--all``: kept machines too)
``vmenv images``     what is cached between sessions, with sizes (``vmenv images rm [ID...]``;
                     ``vmenv images build NAME`` builds a Debian image ahead, for CI caches)
``vmenv shell ID``   an interactive shell in a machine (a kept one, typically)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .backend import Backend, Cache, CacheKeeper, MachineRef, Snapshot, SpecCheck, owner_alive
from .caches import (
    human_size,
    image_caches,
    live_sessions,
    other_files,
    remove_image,
    remove_scratch,
    scratch_caches,
    template_caches,
)
from .config import load_config
from .errors import BackendUnavailable, ConfigError, VmenvError
from .images import (
    BASES,
    INITS,
    BuildEvent,
    ImageCache,
    LinePrinter,
    Recipe,
    builder_problem,
    check_packages,
    subscribe,
)
from .ledger import file_lock, owners
from .paths import state_dir
from .reaper import close_backends, sweep
from .registry import SHIPPED, Registry

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


def _caches(state: Path) -> tuple[list[Cache], list[Backend]]:
    """Every cache in ``state`` (see :mod:`.caches`) and the backends made to list them."""
    registry = Registry()
    options = _options(registry)
    live = live_sessions(state)
    found = scratch_caches(state, live)
    made: list[Backend] = []
    listed: set[str] = set()  # backends whose every cache is listed
    why: dict[str, str] = {}
    seen: set[type[Any]] = set()
    for name in registry:
        try:
            cls = registry.load(name)
            if cls in seen:
                continue  # an alias (kvm -> libvirt)
            seen.add(cls)
            backend: Backend = cls(options.get(name, {}))
        except (BackendUnavailable, ConfigError) as exc:
            why[name] = exc.reason if isinstance(exc, BackendUnavailable) else str(exc)
            continue
        made.append(backend)
        try:
            if isinstance(backend, CacheKeeper):  # lists what it keeps without a hypervisor
                found += backend.caches(live)
                listed.add(backend.name)
                continue
            backend.check()
            snaps = getattr(backend, "templates", None)
            found += template_caches(backend, snaps() if callable(snaps) else [], live)
            why[backend.name] = "files the backend does not list as caches"
        except VmenvError as exc:
            why[backend.name] = exc.reason if isinstance(exc, BackendUnavailable) else str(exc)
    found += image_caches(state, found)
    for name in sorted((set(registry) | set(SHIPPED)) - listed):
        reason = why.get(name) or "its backend is not installed here"
        row = other_files(state, name, [c for c in found if c.backend == name], reason)
        if row is not None:
            found.append(row)
    return found, made


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


def _pick(caches: Sequence[Cache], wanted: Sequence[str]) -> tuple[set[str], list[str]]:
    """(ids of the caches named by ``wanted``: an id, a template key or a unique prefix of an
    id; errors for names that match none or several)."""
    picked: set[str] = set()
    problems = []
    for name in wanted:
        exact = [
            c
            for c in caches
            if name in (c.id, getattr(c.handle, "key", None)) and c.kind != "other files"
        ]
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


def _images_rm(args: argparse.Namespace, state: Path) -> int:
    caches, backends = _caches(state)
    close_backends(backends)
    targets, problems = _pick(caches, args.keys) if args.keys and not args.all else (None, [])
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    freed, failed = 0, False
    removed: set[str] = set()
    for _round in range(len(_REMOVAL_ORDER) + 2):  # a removal can free what stacked under it
        caches, backends = _caches(state)
        try:
            todo = [
                c
                for c in caches
                if c.kind != "other files"
                and not c.held
                and c.id not in removed
                and (targets is None or c.id in targets)
            ]
            todo.sort(key=lambda c: _REMOVAL_ORDER.index(c.kind) if c.kind in _REMOVAL_ORDER else 9)
            for cache in todo:
                try:
                    _remove(cache, backends, state)
                except (VmenvError, OSError) as exc:
                    print(f"error: {cache.kind} {cache.id}: {exc}", file=sys.stderr)
                    failed = True
                    removed.add(cache.id)  # not retried
                    continue
                removed.add(cache.id)
                freed += cache.size or 0
                where = f"{cache.backend} " if cache.backend else ""
                print(f"removed {where}{cache.kind} {cache.id} ({human_size(cache.size)})")
        finally:
            close_backends(backends)
        if not todo:
            break
    caches, backends = _caches(state)
    close_backends(backends)
    left = [c for c in caches if c.id not in removed and (targets is None or c.id in targets)]
    for cache in left:
        if cache.kind == "other files":
            print(f"left {cache.path} ({human_size(cache.size)}): {cache.held}")
        else:
            print(f"left {cache.kind} {cache.id}: in use: {cache.held}")
    if not removed and not left:
        print(f"no cached images in {state}")
    elif removed:
        print(f"freed {human_size(freed)}")
    in_use = targets is not None and any(c.kind != "other files" for c in left)
    return 1 if problems or failed or in_use else 0


def _recipe(name: str, packages: str, init: str) -> Recipe:
    """The recipe ``vmenv images build NAME`` builds: a built-in base or [images.NAME]."""
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


def _images_build(args: argparse.Namespace, state: Path) -> int:
    if len(args.keys) != 1:
        print("vmenv images build: give one image NAME (e.g. debian-12)", file=sys.stderr)
        return 2
    try:
        recipe = _recipe(args.keys[0], args.packages, args.init)
    except ConfigError as exc:
        print(f"vmenv images build: {exc}", file=sys.stderr)
        return 2
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


def _stderr_line(text: str) -> None:
    end = "\n" if not sys.stderr.isatty() else "\x1b[K\n"
    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + text + end)
    sys.stderr.flush()


def _status_line(event: BuildEvent) -> None:
    width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be rewritten
    sys.stderr.write("\r" + event.status(width) + "\x1b[K")
    sys.stderr.flush()


def cmd_images(args: argparse.Namespace) -> int:
    state = state_dir()
    if args.action == "rm":
        return _images_rm(args, state)
    if args.action == "build":
        return _images_build(args, state)
    if args.keys:
        print("vmenv images: KEY... goes with rm: vmenv images rm KEY...", file=sys.stderr)
        return 2
    caches, backends = _caches(state)
    close_backends(backends)
    if not caches:
        print(f"no cached images in {state}")
        return 0
    rows = [
        (
            c.kind,
            c.backend or "-",
            human_size(c.size),
            _age(c.created),
            c.id,
            c.detail
            if c.kind == "other files"
            else c.detail + (f"; in use: {c.held}" if c.held else ""),
        )
        for c in caches
    ]
    header = ("KIND", "BACKEND", "SIZE", "AGE", "ID", "DETAIL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print(
            f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
            f"{row[3]:>{widths[3]}}  {row[4]:<{widths[4]}}  {row[5]}"
        )
    total = sum(c.size or 0 for c in caches)
    held = sum(1 for c in caches if c.held)
    note = f"; {held} in use or not ours to remove (vmenv images rm leaves them)" if held else ""
    print(f"total {human_size(total)} in {state}{note}")
    return 0


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
    images = sub.add_parser(
        "images",
        help="what is cached between sessions (templates, unpacked images...), with sizes",
        description="List the caches in the state dir; `rm` removes every one (or those "
        "named) that no live session or machine uses; `build NAME` builds a Debian image "
        "(for CI caches: the state dir then holds it).",
    )
    images.add_argument("action", nargs="?", choices=["ls", "rm", "build"], default="ls")
    images.add_argument(
        "keys",
        nargs="*",
        metavar="ID",
        help="with rm: ids (or prefixes) to remove; with build: the image NAME (debian-12, or "
        "an [images.NAME] recipe of vmenv.toml here)",
    )
    images.add_argument("--all", action="store_true", help="with rm: every cache (the default)")
    images.add_argument(
        "--packages", default="", metavar="A,B", help="with build: packages to add to the recipe"
    )
    images.add_argument(
        "--init", default="systemd", choices=INITS, help="with build: the init (default systemd)"
    )
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
