"""Read-only overlay layers: templates, live snapshots, and the stacks clones boot on.

A layer is ``<state>/emulator/layers/<name>/`` holding ``fs/`` (a frozen overlay upper dir,
whiteouts and opaque xattrs included), ``meta.json`` (the full stack, top first, and the
labels of whoever built it: session, owner token, created, reuse) and ``complete``, written
last: a layer without it is a torn build and is rebuilt. A :class:`Snapshot`'s
``data["layers"]`` is the stack a clone mounts under its own upper dir.

The labels are written into the build dir *first*, before any content, so a build torn by a
SIGKILL (``.build-*``) is attributable too: :func:`listing` shows complete and torn layers
with their labels, and a sweep decides by ``owner_alive(snapshot.owner)`` (keeping
``reuse`` templates, which are meant to outlive their session).

Stacks are bounded: ``mount(2)`` options are one page, so a chain deeper than
:data:`MAX_DEPTH` is refused with a clear error rather than failing with a misleading errno.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import errors
from ...backend import Snapshot
from ...diagnose import provision_failed
from . import disk, userns
from .control import CommandTimedOut

if TYPE_CHECKING:
    from ...spec import MachineSpec
    from .record import Guest

__all__ = [
    "CACHES_LOCK",
    "MAX_DEPTH",
    "build_lock",
    "caches_lock",
    "commit",
    "live_snapshot",
    "listing",
    "load",
    "lock_path",
    "provision",
    "remove",
    "stack_of",
]

MAX_DEPTH = 60
NAME = "emulator"


def _dirname(key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key) and not key.startswith("."):
        return f"tpl-{key}"
    return "tpl-" + hashlib.sha256(key.encode()).hexdigest()[:32]


CACHES_LOCK = "caches.lock"
"""``<state>/emulator/caches.lock``: every build holds it shared; removing caches, exclusive."""


@contextlib.contextmanager
def caches_lock(emu_dir: Path, *, exclusive: bool = False) -> Iterator[bool]:
    """The emulator's state-wide caches lock (``flock`` on :data:`CACHES_LOCK`).

    Shared: waits for it, and yields True; every template build holds it so for its whole
    length (base image unpack and host mask included, see :func:`build_lock`). Exclusive:
    does not wait; yields whether it was taken. While it is held exclusive no build runs
    and none starts, so what is on disk may be removed, a build's lock files included.
    """
    emu_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(emu_dir / CACHES_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def lock_path(final: Path) -> Path:
    """The build lock file of a template layer dir (``layers/.tpl-KEY.lock``)."""
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def build_lock(emu_dir: Path, key: str) -> Iterator[Path]:
    """Serialize builds of one key (threads and processes); yields the layer's final dir.

    The caches lock is taken shared first and held throughout, so ``vmenv images rm``
    never removes what a build is using, and no one holds or opens a key's lock file while
    it holds the caches lock exclusive (when it may delete that file).
    """
    root = emu_dir / "layers"
    root.mkdir(parents=True, exist_ok=True)
    final = root / _dirname(key)
    with caches_lock(emu_dir), open(lock_path(final), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield final


def _snapshot(layer: Path, meta: dict[str, Any]) -> Snapshot:
    labels = {k: meta.get(k) for k in ("session", "owner", "created", "reuse")}
    complete = (layer / "complete").exists()
    return Snapshot(
        backend=NAME,
        name=str(meta.get("name", layer.name)),
        handle=str(layer),
        key=str(meta.get("key", "")),
        data={"layers": list(meta.get("layers", []))},
        session=str(labels["session"] or ""),
        owner=str(labels["owner"] or ""),
        created=float(labels["created"] or 0.0),
        reuse=bool(labels["reuse"]),
        complete=complete,
    )


def labels(session: str, owner: str, reuse: bool = False) -> dict[str, Any]:
    """The labels a layer carries: who built it, when, and whether it is meant to be reused."""
    return {"session": session, "owner": owner, "created": time.time(), "reuse": reuse}


def load(final: Path) -> Snapshot | None:
    """The snapshot of a complete layer dir, or None (a missing or torn one is removed)."""
    if not (final / "complete").exists():
        userns.rmtree(final)
        return None
    return _snapshot(final, json.loads((final / "meta.json").read_text()))


def listing(root: Path) -> list[Snapshot]:
    """Every template and snapshot layer under ``root``, complete or torn, with its labels.

    Shared infrastructure layers (``mask-*``) and torn builds without labels are left out:
    they belong to no session.
    """
    found: list[Snapshot] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    for layer in entries:
        if not layer.name.startswith(("tpl-", "snap-", ".build-")) or not layer.is_dir():
            continue
        try:
            meta = json.loads((layer / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # an unlabelled torn build, or one being labelled right now
        if isinstance(meta, dict) and "owner" in meta:
            found.append(_snapshot(layer, meta))
    return found


def _begin(root: Path, prefix: str, meta: dict[str, Any]) -> Path:
    """A new build dir, labelled before anything else is put in it."""
    build = root / f".build-{prefix}{uuid.uuid4().hex}"
    build.mkdir(parents=True)
    (build / "meta.json").write_text(json.dumps(meta))
    return build


def commit(
    final: Path,
    key: str,
    name: str,
    upper: Path | None,
    base: list[str],
    log: str,
    tags: dict[str, Any],
) -> Snapshot:
    """Freeze ``upper`` (moved, not copied) into ``final`` over ``base``, labelled ``tags``."""
    meta: dict[str, Any] = {"key": key, "name": name, "layers": list(base), **tags}
    build = _begin(final.parent, "", meta)
    stack = list(base)
    if upper is not None:
        try:
            upper.rename(build / "fs")
        except OSError as exc:  # on the guest's own disk (disk=): copy it off
            if exc.errno != errno.EXDEV:
                raise
            try:
                _copy_tree(upper, build / "fs")
            except subprocess.CalledProcessError as err:
                detail = err.stderr.decode(errors="replace").strip()
                raise OSError(errno.EIO, f"copying {upper} failed: {detail}") from None
        stack.insert(0, str(final / "fs"))
    _check_depth(stack)
    (build / "provision.log").write_text(log)
    meta["layers"] = stack
    (build / "meta.json").write_text(json.dumps(meta))
    (build / "complete").write_text(time.ctime() + "\n")
    build.rename(final)
    loaded = load(final)
    assert loaded is not None
    return loaded


def stack_of(snapshot: Snapshot) -> list[str]:
    """The layer stack a snapshot stands for, checked to still exist."""
    if snapshot.backend != NAME:
        raise errors.BackendError(
            f"{NAME}: snapshot {snapshot.name!r} belongs to backend {snapshot.backend!r}"
        )
    stack = [str(s) for s in snapshot.data.get("layers", [])]
    if not stack:
        raise errors.BackendError(f"{NAME}: snapshot {snapshot.name!r} has no layers")
    for entry in stack:
        if not entry.startswith("@") and not Path(entry).is_dir():
            raise errors.BackendError(
                f"{NAME}: snapshot {snapshot.name!r} is gone (layer {entry} no longer exists)"
            )
    return stack


def _check_depth(stack: list[str]) -> None:
    if len(stack) > MAX_DEPTH:
        raise errors.BackendError(
            f"{NAME}: a layer stack of {len(stack)} layers is deeper than {MAX_DEPTH} (the "
            "overlay mount options would not fit); snapshot a fresh clone of the template "
            "instead of chaining snapshots"
        )


def provision(guest: Guest, spec: MachineSpec, start: float) -> str:
    """Run ``spec.provision`` in ``guest``; the whole build is bounded by ``spec.timeout``."""
    assert guest.conn is not None
    log: list[str] = []
    for step in spec.provision:
        argv = ["/bin/sh", "-c", step] if isinstance(step, str) else list(step)
        shown = step if isinstance(step, str) else " ".join(step)
        left = spec.timeout - (time.monotonic() - start)
        if left <= 0:
            raise errors.ProvisionError(
                f"{NAME}: provisioning {spec.name!r} ran past its "
                f"timeout of {spec.timeout:g}s before {shown!r}"
            )
        try:
            code, out, err = guest.conn.execute(argv, input=None, env=None, user=None, timeout=left)
        except CommandTimedOut:
            raise errors.ProvisionError(
                f"{NAME}: provision step {shown!r} of {spec.name!r} timed out (the build is "
                f"bounded by timeout={spec.timeout:g}s)"
            ) from None
        text_out = out.value().decode("utf-8", "replace")
        text_err = err.value().decode("utf-8", "replace")
        cut = out.dropped + err.dropped
        note = f"[vmenv: {cut} more bytes of output not kept]\n" if cut else ""
        log.append(f"$ {shown}\n{text_out}{text_err}{note}[exit {code}]\n")
        with open(guest.dir / "boot.log", "a", encoding="utf-8") as f:
            f.write(log[-1])
        if code != 0:
            raise provision_failed(
                NAME, spec.name, step, code, text_out, text_err, outbound=spec.outbound
            )
    return "".join(log)


def live_snapshot(guest: Guest, name: str, emu_dir: Path, tags: dict[str, Any]) -> Snapshot:
    """Copy a running guest's upper dir (frozen meanwhile) into a new read-only layer."""
    stack_depth = len(guest.stack) + 1
    _check_depth(["x"] * stack_depth)
    final = emu_dir / "layers" / f"snap-{uuid.uuid4().hex[:16]}"
    stack = [str(final / "fs"), *guest.stack]
    meta: dict[str, Any] = {"key": "", "name": name, "layers": stack, "guest": guest.id, **tags}
    build = _begin(final.parent, "snap-", meta)
    try:
        try:
            _freeze(guest, True)
        except OSError as exc:
            raise errors.BackendError(
                f"{NAME}: snapshot of {guest.name!r} refused: its processes could not be "
                f"frozen ({exc.strerror or exc}), and a copy of a running guest may be torn"
            ) from exc
        _copy_tree(disk.upper_dir(guest.dir), build / "fs")
    except BaseException as exc:
        userns.rmtree(build)
        if isinstance(exc, subprocess.CalledProcessError):
            raise errors.BackendError(
                f"{NAME}: snapshot of {guest.name!r} failed: {exc.stderr.decode(errors='replace')}"
            ) from exc
        raise
    finally:
        _thaw(guest)
    (build / "complete").write_text(time.ctime() + "\n")
    build.rename(final)
    return _snapshot(final, meta)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy an upper dir: ``cp -a`` never follows symlinks and keeps whiteouts (0/0 char
    devices) and xattrs (trusted.overlay.* as root, user.overlay.* in the user-namespace
    mode; with a full id map, in a namespace of that map so owners stay, see :mod:`.userns`)."""
    argv = [*userns.mapped_argv(), "cp", "-a", "--", str(src), str(dst)]
    subprocess.run(argv, check=True, capture_output=True)


def _freeze(guest: Guest, frozen: bool) -> None:
    """The cgroup freezer, or (none: the user-namespace mode without a delegated one)
    SIGSTOP from PID 1."""
    if guest.groups.can_freeze or guest.conn is None:
        guest.groups.freeze(frozen)
        return
    reply = guest.conn.request({"op": "freeze" if frozen else "thaw"})
    if "error" in reply:
        raise OSError(reply.get("errno") or errno.EIO, str(reply["error"]))


def _thaw(guest: Guest) -> None:
    """Thaw, also after a failed or timed-out freeze (which may have half-frozen it)."""
    try:
        _freeze(guest, False)
    except OSError as exc:
        if exc.errno != errno.ENOTSUP:
            raise


def remove(layer: Path, emu_dir: Path) -> None:
    """Delete a layer dir, only ever inside ``<state>/emulator/layers``."""
    root = (emu_dir / "layers").resolve()
    try:
        target = layer.resolve()
    except OSError:
        return
    if target.parent != root:
        raise errors.BackendError(f"{NAME}: refusing to remove {layer}: not a layer of {root}")
    userns.rmtree(target)
