"""The ``vmenv`` command (also ``python -m pytest_vmenv``).

``vmenv backends``   installed backends, whether each can run here, and if not why
``vmenv ls``         live and kept machines: backend, session, age, state
``vmenv gc``         destroy what dead sessions left (``--all``: kept machines too)
``vmenv images``     what is cached between sessions, with sizes (``vmenv images rm ID...|--all``;
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backend import (
    Backend,
    Cache,
    CacheKeeper,
    MachineRef,
    Snapshot,
    SpecCheck,
    TemplateLister,
    owner_alive,
)
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
from .errors import BackendUnavailable, ConfigError, TemplateInUse, VmenvError
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


def _options_of(name: str, cls: type[Any], options: Mapping[str, Mapping[str, Any]]) -> Any:
    """The options of backend ``name``; an alias (``kvm``) falls back to its class's name's
    (``libvirt``: the table users write, and the name the ledger records them under)."""
    return options.get(name) or options.get(str(getattr(cls, "name", name)), {})


def _made() -> Iterator[tuple[str, Backend | str]]:
    """(name, backend) for each installed backend, made with its options but not checked,
    or (name, reason) when it cannot be made; an alias (``kvm`` of ``libvirt``) once."""
    registry = Registry()
    options = _options(registry)
    seen: set[type[Any]] = set()
    for name in registry:
        try:
            cls = registry.load(name)
            if cls in seen:
                continue
            seen.add(cls)
            backend: Backend = cls(_options_of(name, cls, options))
        except (BackendUnavailable, ConfigError) as exc:
            yield name, _reason(exc)
            continue
        yield name, backend


def _reason(exc: VmenvError) -> str:
    return exc.reason if isinstance(exc, BackendUnavailable) else str(exc)


def _backends() -> Iterator[tuple[str, Backend | str]]:
    """(name, backend) for each installed backend, or (name, reason) when it cannot run."""
    for name, backend in _made():
        if not isinstance(backend, str):
            try:
                backend.check()
            except (BackendUnavailable, ConfigError) as exc:
                close_backends([backend])
                yield name, _reason(exc)
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
    for line in report.left:
        print(f"left {line}")
    for line in report.errors:
        print(f"error: {line}", file=sys.stderr)
    if not report.removed and not report.errors and not report.left:
        print("nothing to remove")
    return 1 if report.errors else 0


@dataclass
class _CacheBackends:
    """The backends ``vmenv images`` lists caches with, each made (and checked) once per
    command: ``made`` to close at the end, ``why`` a backend lists nothing (by name),
    ``names`` every backend name whose files under the state dir are counted."""

    made: list[Backend] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)


def _cache_backends() -> _CacheBackends:
    """Every installed backend that can list its caches here: a :class:`CacheKeeper` as it
    is (it lists what it keeps without its hypervisor), a :class:`TemplateLister` once its
    ``check()`` passes."""
    found = _CacheBackends(names=set(Registry()) | set(SHIPPED))
    for name, backend in _made():
        if isinstance(backend, str):
            found.why[name] = backend
            continue
        if not isinstance(backend, CacheKeeper):
            try:
                backend.check()
            except VmenvError as exc:
                found.why[backend.name] = _reason(exc)
                close_backends([backend])
                continue
        found.made.append(backend)
    return found


def _caches(state: Path, backends: _CacheBackends) -> list[Cache]:
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
            why[backend.name] = _reason(exc)
    found += image_caches(state, found)
    for name in sorted(backends.names - listed):
        reason = why.get(name) or "its backend is not installed here"
        row = other_files(state, name, [c for c in found if c.backend == name], reason)
        if row is not None:
            found.append(row)
    return found


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


def _what(cache: Cache) -> str:
    """``tarball image ID``; a kind the id already names once (``scratch/NAME``)."""
    return cache.id if cache.id.startswith(f"{cache.kind}/") else f"{cache.kind} {cache.id}"


def _spared_by_all(cache: Cache) -> str:
    """Why ``--all`` leaves ``cache`` unless it is named, or '' if ``--all`` takes it."""
    if isinstance(cache.handle, Snapshot) and cache.handle.data.get("reuse"):
        return "reusable (--vm-reuse); name it to remove it"
    if cache.size is None:
        return "not on this host (sessions elsewhere may use it); name it to remove it"
    return ""


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


_RM_USAGE = (
    "vmenv images rm: name what to remove: IDs from `vmenv images` (or a template key, or a "
    "unique prefix of an id), or --all for every cache that nothing live uses (--all leaves "
    "--vm-reuse templates and templates not on this host unless they are named too); "
    "nothing was removed"
)


def _images_rm(args: argparse.Namespace, state: Path) -> int:
    if not args.keys and not args.all:
        print(_RM_USAGE, file=sys.stderr)
        return 2
    backends = _cache_backends()
    try:
        return _remove_caches(args, state, backends)
    finally:
        close_backends(backends.made)


def _remove_caches(args: argparse.Namespace, state: Path, backends: _CacheBackends) -> int:
    named, problems = _pick(_caches(state, backends), args.keys)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)

    def chosen(cache: Cache) -> bool:
        if cache.kind == "other files":
            return False
        return cache.id in named or (args.all and not _spared_by_all(cache))

    freed = 0
    removed: set[str] = set()
    failed: set[str] = set()  # not retried
    busy: set[str] = set()  # found in use when removed (a backend's own check)
    for _round in range(len(_REMOVAL_ORDER) + 2):  # a removal can free what stacked under it
        todo = [
            c
            for c in _caches(state, backends)
            if chosen(c) and not c.held and c.id not in removed | failed | busy
        ]
        todo.sort(key=lambda c: _REMOVAL_ORDER.index(c.kind) if c.kind in _REMOVAL_ORDER else 9)
        for cache in todo:
            try:
                _remove(cache, backends.made, state)
            except TemplateInUse as exc:
                print(f"left {_what(cache)}: in use: {exc.holder}")
                busy.add(cache.id)
                continue
            except (VmenvError, OSError) as exc:
                print(f"error: {_what(cache)}: {exc}", file=sys.stderr)
                failed.add(cache.id)
                continue
            removed.add(cache.id)
            freed += cache.size or 0
            where = f"{cache.backend} " if cache.backend else ""
            print(f"removed {where}{_what(cache)} ({human_size(cache.size)})")
        if not todo:
            break
    left = [
        c
        for c in _caches(state, backends)
        if c.id not in removed | failed | busy
        and (c.id in named or (args.all and (c.held or _spared_by_all(c))))
    ]
    for cache in left:
        if cache.kind == "other files":
            print(f"left {cache.path} ({human_size(cache.size)}): {cache.held}")
        elif cache.held:
            print(f"left {_what(cache)}: in use: {cache.held}")
        else:
            print(f"left {_what(cache)}: {_spared_by_all(cache)}")
    if removed:
        print(f"freed {human_size(freed)}")
    elif not left and not busy and not failed:
        print(f"no cached images in {state}")
    in_use = bool(busy & named) or any(c.id in named for c in left)
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
    if args.keys or args.all:
        print("vmenv images: ID... and --all go with rm: vmenv images rm ID...", file=sys.stderr)
        return 2
    backends = _cache_backends()
    try:
        caches = _caches(state, backends)
    finally:
        close_backends(backends.made)
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
        description="List the caches in the state dir; `rm ID...` removes those named, "
        "`rm --all` every one, that no live session or machine uses; `build NAME` builds a "
        "Debian image (for CI caches: the state dir then holds it).",
    )
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
    shell = sub.add_parser("shell", help="a shell in a machine")
    shell.add_argument("machine", metavar="ID", help="a machine's id (or unique name)")
    shell.add_argument("command", nargs="*", help="a command instead of the login shell")
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
