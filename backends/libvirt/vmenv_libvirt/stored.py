"""The built images under ``<state>/libvirt/images``, as ``vmenv images`` lists and removes them.

Contract of :func:`listing`: one :class:`~pytest_vmenv.backend.Cache` per image dir, ``tiny-2``,
``tiny-ssh-3`` (:mod:`.tiny`), ``debian-<format>-<key>`` (:mod:`.debian`) and
``bootdisk-<format>-<key>`` (:mod:`.bootdisk`): kind ``image``,
id its dir name, the recipe it was built from (its ``meta.json``), its size on disk, when it
was built and when a template was last built on it. A build dir (``*.build``), a dir without
its ``meta.json`` and a removal that died half way (``.rm-*``) are each a ``torn image build``.

Who uses an image: a template's disk is a qcow2 overlay whose backing file is the image's
``rootfs.qcow2``, and it boots the image's kernel; the template's clones stack on the
template. :func:`building_on` makes a template's overlay under the image's lock held shared
and notes the template in the image's ``users/`` (its disk, key and state dir; the note goes
with the template, :func:`forget`; ``users/last-used`` is when one was last built). An image is
held while a noted disk exists, whichever state dir it is in (CI's checkouts share one images
dir through a symlink), while a template record of this state dir boots its kernel, and
while its lock is held (it is being built, or a template is being built on it).

:func:`remove` takes the image's lock exclusively without waiting, looks again under it, and
moves the dir aside (``.rm-<uuid>`` in the same dir: a symlinked images dir stays a symlink and
the image goes from the dir it points to) before :func:`pytest_vmenv.images.remove_tree`
deletes it (no link is followed out).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_vmenv import errors
from pytest_vmenv.backend import Cache
from pytest_vmenv.caches import disk_usage
from pytest_vmenv.images import Recipe, read_json, remove_tree
from pytest_vmenv.ledger import flocked, write_json

from .bootdisk import EXPORT_PACKAGES
from .connection import NAME
from .debian import GUEST_PACKAGES

__all__ = ["StoredImage", "building_on", "forget", "listing", "remove"]

_TORN = "torn image build"
_STAMP = "last-used"


@dataclass(frozen=True)
class StoredImage:
    """One entry of the images dir: a complete image, or a torn (or running) build."""

    path: Path
    complete: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The image's dir name (``tiny-1``), for a build dir too (``tiny-1.build``)."""
        return self.path.name.removesuffix(".build")

    @property
    def lock(self) -> Path | None:
        """The lock its builds, removals and template builds on it take (None: ``.rm-*``)."""
        return None if self.path.name.startswith(".") else self.path.with_name(f"{self.name}.lock")


def _entries(images: Path) -> list[StoredImage]:
    try:
        dirs = sorted(p for p in images.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    found = []
    for path in dirs:
        meta = read_json(path / "meta.json")
        whole = bool(meta) and not path.name.startswith(".") and not path.name.endswith(".build")
        found.append(StoredImage(path, whole, meta if whole else {}))
    return found


def describe(image: StoredImage) -> str:
    """What ``image`` was built from, in one line (its ``meta.json``)."""
    meta = image.meta
    recipe = meta.get("recipe")
    if isinstance(recipe, dict):
        try:
            return _described(image.name, recipe)
        except (errors.ConfigError, TypeError, ValueError):  # a meta.json of another version
            return f"recipe {json.dumps(recipe, sort_keys=True)}"
    packages = meta.get("packages")
    debs = ", ".join(sorted(packages)) if isinstance(packages, dict) else "?"
    return f"the built-in {image.name.rsplit('-', 1)[0]} image, recipe {recipe} ({debs})"


def _described(name: str, recipe: Mapping[str, Any]) -> str:
    export = name.startswith("bootdisk-")
    added = EXPORT_PACKAGES if export else GUEST_PACKAGES
    asked = [p for p in recipe.get("packages", ()) if p not in added]
    what = Recipe(str(recipe.get("base")), tuple(asked), str(recipe.get("init"))).describe()
    if export:
        return f"{what} plus the export packages, as a BIOS-bootable disk (qcow2 and VMDK)"
    return f"{what} plus the guest packages, as qcow2"


def _note(image: Path, disk: Path) -> Path:
    return image / "users" / f"{hashlib.sha256(str(disk).encode()).hexdigest()[:16]}.json"


def _users(image: StoredImage, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The templates built on ``image`` whose disk exists: noted ones, and this state dir's
    records that boot its kernel."""
    found = []
    for note in sorted((image.path / "users").glob("*.json")):
        user = read_json(note)
        if user.get("disk") and os.path.exists(str(user["disk"])):
            found.append(user)
    inside = str(image.path) + os.sep
    for record in records:
        boot = record.get("boot") or {}
        kernel = str(boot.get("kernel") or "") if isinstance(boot, Mapping) else ""
        disk = str(record.get("disk") or "")
        noted = any(u.get("disk") == disk for u in found)
        if kernel.startswith(inside) and disk and os.path.exists(disk) and not noted:
            found.append({"disk": disk, "key": record.get("key"), "state_dir": ""})
    return found


def _user_phrase(user: Mapping[str, Any], state_dir: Path) -> str:
    """Who ``user`` is and what to do: the template's key, disk and state dir."""
    key, other = user.get("key"), str(user.get("state_dir") or "")
    where = f" of the state dir {other}" if other else ""
    env = f"VMENV_STATE_DIR={other} " if other and Path(other) != state_dir else ""
    return (
        f"template {key}{where} is built on it (its disk {user['disk']} has the image's "
        f"rootfs.qcow2 as backing file): remove the template first (`{env}vmenv images rm "
        f"{key}`)"
    )


def _held(image: StoredImage, records: Iterable[Mapping[str, Any]], state_dir: Path) -> str:
    """Why ``image`` must stay (checked without its lock), or ''."""
    users = _users(image, records) if image.complete else []
    if users:
        return "; ".join(_user_phrase(u, state_dir) for u in users)
    if image.lock is not None and image.lock.exists():
        try:
            with flocked(image.lock, wait=False):
                pass
        except BlockingIOError:
            return "it is being built, or a template is being built on it"
    return ""


def _last_used(image: StoredImage) -> float:
    """When a template was last built on ``image`` (0: never, as far as its stamp says)."""
    try:
        return (image.path / "users" / _STAMP).stat().st_mtime
    except OSError:
        return 0.0


def _detail(image: StoredImage) -> str:
    if not image.complete:
        return f"a build of {image.name} that did not finish (or one running now)"
    seconds = image.meta.get("seconds")
    built = f"; built in {seconds:.0f}s" if isinstance(seconds, int | float) else ""
    used = _last_used(image)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(used)) if used else ""
    return describe(image) + built + (f"; a template was last built on it {when}" if when else "")


def listing(images: Path, records: Iterable[Mapping[str, Any]], state_dir: Path) -> list[Cache]:
    """Every image and torn build in ``images`` (see the module docstring); ``records``: the
    template records of ``state_dir``."""
    records = list(records)
    found = []
    for image in _entries(images):
        stamp = image.meta.get("created")
        created = float(stamp) if isinstance(stamp, int | float) else 0.0
        if not created:
            with contextlib.suppress(OSError):
                created = image.path.stat().st_mtime
        found.append(
            Cache(
                backend=NAME,
                kind="image" if image.complete else _TORN,
                id=image.path.name,
                size=disk_usage(image.path),
                path=str(image.path),
                detail=_detail(image),
                created=created,
                held=_held(image, records, state_dir),
                handle=image,
            )
        )
    return found


def remove(
    images: Path, cache: Cache, records: Iterable[Mapping[str, Any]], state_dir: Path
) -> None:
    """Remove the image (or torn build) of ``cache``: BackendError, saying what to do, if it
    is being built, being built on, or a template is built on it."""
    image = cache.handle
    if not isinstance(image, StoredImage) or os.path.realpath(image.path.parent) != (
        os.path.realpath(images)
    ):
        raise errors.BackendError(f"{NAME}: refusing to remove {cache.path}: not in {images}")
    try:
        with contextlib.ExitStack() as stack:
            if image.lock is not None:
                stack.enter_context(flocked(image.lock, wait=False))
            users = _users(image, records) if image.complete else []
            if users:
                raise errors.BackendError(
                    f"{NAME}: image {cache.id} is in use: {_user_phrase(users[0], state_dir)}"
                )
            if not image.path.exists():
                return
            doomed = image.path.with_name(f".rm-{uuid.uuid4().hex}")
            image.path.rename(doomed)
    except BlockingIOError:
        raise errors.BackendError(
            f"{NAME}: image {cache.id} is being built, or a template is being built on it, "
            f"now (its lock {image.lock} is held); try again when that is done"
        ) from None
    remove_tree(doomed)


def building_on(image: Path | None, key: str, state_dir: Path, make: Callable[[], Path]) -> Path:
    """``make()`` (template ``key``'s overlay on the built image dir ``image``) under the
    image's lock held shared, noted in the image's ``users/``; its path. ``image`` None (a
    user's disk): just ``make()``."""
    if image is None:
        return make()
    with flocked(image.with_name(f"{image.name}.lock"), shared=True):
        if not (image / "meta.json").exists():
            raise errors.BackendError(
                f"{NAME}: image {image} was removed while template {key} was being planned on "
                "it; run again (it is built anew)"
            )
        disk = make()
        note = _note(image, disk)
        note.parent.mkdir(exist_ok=True)
        write_json(note, {"disk": str(disk), "key": key, "state_dir": str(state_dir),
                          "at": time.time()})  # fmt: skip
        (note.parent / _STAMP).touch()
        return disk


def forget(record: Mapping[str, Any]) -> None:
    """Drop the note of the template of ``record`` (being removed) from its image's ``users/``."""
    boot, disk = record.get("boot"), record.get("disk")
    kernel = boot.get("kernel") if isinstance(boot, Mapping) else None
    if kernel and disk:
        _note(Path(str(kernel)).parent, Path(str(disk))).unlink(missing_ok=True)
