"""Built images in the state dir: built once, kept across sessions, shared under a lock.

Layout under ``<state>/images`` (0700: trees hold setuid programs):

* ``<key>/rootfs``: the tree; ``<key>/recipe.json``: recipe, archive lines, when and how
  long it took; ``<key>/build.log``: the builder's output. A ``<key>`` dir is always complete:
  a build happens in ``.build-<uuid>/`` (labelled first with its owner and key in
  ``build.json``) and is renamed to ``<key>`` when done;
* ``builds.log``: one JSON line per build, so a cache hit is provably not a build;
* ``<key>.failed.log``: the builder's output of the last failed build of a key.

Builds of one key are serialized by an ``flock`` on ``<state>/locks/image-<key>.lock``
(threads, xdist workers and concurrent sessions alike); whoever waits publishes ``waiting``
events (see :mod:`.progress`) and takes the image the builder renamed into place. A backend
building on an image holds the same lock shared (:meth:`ImageCache.using`); removal takes it
exclusively, without waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendError, ConfigError, ProvisionError
from ..owners import owner_alive, owner_token
from ..poll import poll_until
from . import subids
from .build import BUILD_TIMEOUT, build_tree, builder_problem
from .progress import BuildEvent, publish
from .recipe import Recipe
from .sources import host_sources, mirrors_for

__all__ = ["BuiltImage", "ImageCache", "read_json", "remove_tree"]


@dataclass(frozen=True)
class BuiltImage:
    """One dir under ``<state>/images``: a complete image, or a build (running or torn)."""

    key: str
    path: Path
    complete: bool
    recipe: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    owner: str = ""  # a build's owner token (empty for a complete image)

    @property
    def building(self) -> bool:
        return not self.complete and bool(self.owner) and owner_alive(self.owner)

    def describe(self) -> str:
        try:
            return Recipe(
                self.recipe["base"], tuple(self.recipe.get("packages", ())), self.recipe["init"]
            ).describe()
        except (KeyError, TypeError, ConfigError):
            return "an unlabelled build"


def _mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + os.sep
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return []
    return [p for p in points if p.startswith(prefix)]


def remove_tree(path: Path) -> None:
    """Remove a tree; one built unprivileged holds files of subordinate ids, removed from a
    user namespace that maps them (:meth:`.subids.SubIds.unshare_argv`). A tree with something
    mounted in it (a builder killed where its mounts were not confined) is refused: removing
    it would walk into the mounted ``/proc``, ``/sys`` or ``/dev``."""
    mounted = _mounts_under(path)
    if mounted:
        raise BackendError(
            f"refusing to remove {path}: {len(mounted)} filesystem(s) are mounted in it "
            f"({', '.join(mounted[:3])}); unmount them first (umount -l)"
        )
    shutil.rmtree(path, ignore_errors=True)
    ids = subids.unprivileged() if os.path.lexists(path) else None
    if ids is not None:
        subprocess.run(
            [*ids.unshare_argv(), "rm", "-rf", "--", str(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    if os.path.lexists(path):
        raise BackendError(f"could not remove all of {path}")


def _unprivileged_ids() -> dict[str, Any]:
    """Unprivileged, the subordinate ranges a tree is built with (its owners depend on them,
    see :mod:`.subids`), for ``recipe.json``."""
    ids = subids.unprivileged()
    return {} if ids is None else {"ids": ids.to_json()}


class ImageCache:
    """The images of one state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @property
    def root(self) -> Path:
        path = self.state_dir / "images"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    def mirrors(self, recipe: Recipe) -> list[str]:
        """The archive lines ``recipe`` is built from (the host's apt configuration)."""
        return mirrors_for(recipe.suite, host_sources(), recipe.base)

    def key(self, recipe: Recipe) -> str:
        return recipe.key(self.mirrors(recipe))

    def lookup(self, recipe: Recipe) -> Path | None:
        """The built tree of ``recipe``, or None (nothing is built)."""
        rootfs = self.root / self.key(recipe) / "rootfs"
        return rootfs if rootfs.is_dir() else None

    def ensure(self, recipe: Recipe) -> Path:
        """The tree of ``recipe``: the cached one, else built now (or by whoever holds the
        key's lock, waited for). Returns ``<state>/images/<key>/rootfs``."""
        mirrors = self.mirrors(recipe)
        key = recipe.key(mirrors)
        final = self.root / key
        if (final / "rootfs").is_dir():
            return final / "rootfs"
        with self._locked(recipe, key, final) as done:
            if done:
                return final / "rootfs"
            problem = builder_problem()
            if problem is not None:
                raise BackendError(f"cannot build image {recipe.describe()}: {problem}")
            self._build(recipe, key, mirrors, final)
        return final / "rootfs"

    @contextlib.contextmanager
    def using(self, recipe: Recipe) -> Iterator[Path]:
        """The tree of ``recipe`` (built if need be), held while the block runs: a backend
        that builds something on the tree holds it until that something is recorded (a
        template that stacks on it), so :meth:`remove` cannot take it away meanwhile."""
        while True:
            rootfs = self.ensure(recipe)
            fd = self._lock_fd(rootfs.parent.name)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if rootfs.is_dir():
                    yield rootfs
                    return
            finally:
                os.close(fd)
            # removed between ensure and the lock: build it again

    def _lock_fd(self, key: str) -> int:
        locks = self.state_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        return os.open(locks / f"image-{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def _locked(self, recipe: Recipe, key: str, final: Path) -> Iterator[bool]:
        """Hold the key's lock; yields True if the image appeared while we waited."""
        fd = self._lock_fd(key)
        started = time.monotonic()
        waits = 0

        def probe(last_try: bool) -> str | None:
            """ "locked", "built" (by another process while we waited), or None."""
            nonlocal waits
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return "locked"
            except BlockingIOError:
                pass
            elapsed = time.monotonic() - started
            if (final / "rootfs").is_dir():
                return "built"
            if last_try:
                raise BackendError(
                    f"waited {elapsed:.0f}s for another process to build image "
                    f"{recipe.describe()} ({final}); giving up"
                )
            publish(
                BuildEvent(
                    recipe.describe(), key, "waiting", "another process is building it",
                    elapsed, tick=waits > 0,
                )
            )  # fmt: skip
            waits += 1
            return None

        try:
            outcome = poll_until(
                probe, timeout=BUILD_TIMEOUT, what=f"the lock of image {key}", interval=1.0
            )
            if outcome == "built":
                self._waited(recipe, key, time.monotonic() - started)
                yield True
                return
            done = (final / "rootfs").is_dir()
            if done and waits:
                self._waited(recipe, key, time.monotonic() - started)
            yield done
        finally:
            os.close(fd)

    @staticmethod
    def _waited(recipe: Recipe, key: str, elapsed: float) -> None:
        """The end of a wait for another process's build (the last event of this one)."""
        step = "built by another process"
        publish(BuildEvent(recipe.describe(), key, "built", step, elapsed))

    def _build(self, recipe: Recipe, key: str, mirrors: list[str], final: Path) -> None:
        root = self.root
        build = root / f".build-{uuid.uuid4().hex}"
        build.mkdir(mode=0o700)
        label = {"owner": owner_token(), "key": key, "created": time.time(), **recipe.to_json()}
        (build / "build.json").write_text(json.dumps(label))
        started = time.monotonic()
        try:
            build_tree(recipe, key, mirrors, build / "rootfs", build / "build.log")
            shutil.rmtree(build / "tmp", ignore_errors=True)
            ids = _unprivileged_ids()
            seconds = time.monotonic() - started
            info = {**recipe.to_json(), "key": key, "mirrors": mirrors, "built": time.time(),
                    "seconds": round(seconds, 1), **ids}  # fmt: skip
            (build / "recipe.json").write_text(json.dumps(info, indent=1) + "\n")
            (build / "build.json").unlink()
            build.rename(final)
        except BaseException as exc:
            failed = root / f"{key}.failed.log"
            with contextlib.suppress(OSError):
                (build / "build.log").replace(failed)
            with contextlib.suppress(BackendError):
                remove_tree(build)
            if isinstance(exc, ConfigError | ProvisionError):
                raise type(exc)(f"{exc}\n    (the builder's output: {failed})") from None
            raise
        record = {"key": key, "image": recipe.describe(), "at": time.time(),
                  "seconds": round(seconds, 1), "pid": os.getpid()}  # fmt: skip
        with open(root / "builds.log", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        publish(BuildEvent(recipe.describe(), key, "built", f"in {seconds:.1f}s", seconds))

    def builds(self) -> list[dict[str, Any]]:
        """Every build recorded in ``builds.log``, oldest first."""
        try:
            lines = (self.root / "builds.log").read_text().splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def listing(self) -> list[BuiltImage]:
        """Every complete image and every build dir (running or torn)."""
        found: list[BuiltImage] = []
        try:
            root = self.state_dir / "images"
            entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return found
        for path in entries:
            if path.name.startswith((".build-", ".rm-")):
                label = read_json(path / "build.json")
                found.append(
                    BuiltImage(
                        key=str(label.get("key", "")), path=path, complete=False, recipe=label,
                        created=float(label.get("created") or _mtime(path)),
                        owner=str(label.get("owner", "")),
                    )
                )  # fmt: skip
            elif not path.name.startswith("."):
                info = read_json(path / "recipe.json")
                found.append(
                    BuiltImage(
                        key=path.name, path=path, complete=True, recipe=info,
                        created=float(info.get("built") or _mtime(path)),
                    )
                )  # fmt: skip
        return found

    def remove(self, image: BuiltImage) -> None:
        """Remove an image (or a torn build): BackendError if it is being built now."""
        name = image.path.name
        if image.path.parent != self.state_dir / "images" or not (
            (image.complete and name == image.key) or name.startswith((".build-", ".rm-"))
        ):
            raise BackendError(f"refusing to remove {image.path}: not an image of {self.root}")
        if image.building:
            raise BackendError(f"image {image.key} is being built (pid of {image.owner})")
        fd = self._lock_fd(image.key or "torn")
        try:
            if image.complete:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise BackendError(
                        f"image {image.key} is in use: it is being built, or something is "
                        "being built on it; try again when that is done"
                    ) from None
            if not image.path.exists():
                return
            doomed = self.root / f".rm-{uuid.uuid4().hex}"
            image.path.rename(doomed)  # gone from view at once, then deleted
            remove_tree(doomed)
        finally:
            os.close(fd)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` if it is missing, unreadable or not an object (a
    torn or foreign file never breaks a listing)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
