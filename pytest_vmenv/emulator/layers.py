"""Read-only overlay layers: templates, live snapshots, and the stacks clones boot on.

A layer is ``<state>/emulator/layers/<name>/`` holding ``fs/`` (a frozen overlay upper dir,
whiteouts and opaque xattrs included), ``meta.json`` (the full stack, top first) and
``complete``, written last: a layer without it is a torn build and is rebuilt. A
:class:`Snapshot`'s ``data["layers"]`` is the stack a clone mounts under its own upper dir.

Stacks are bounded: ``mount(2)`` options are one page, so a chain deeper than
:data:`MAX_DEPTH` is refused with a clear error rather than failing with a misleading errno.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..backend import Snapshot
from .control import CommandTimedOut

if TYPE_CHECKING:
    from ..spec import MachineSpec
    from .host import Guest

__all__ = [
    "MAX_DEPTH",
    "build_lock",
    "commit",
    "live_snapshot",
    "load",
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


@contextlib.contextmanager
def build_lock(emu_dir: Path, key: str) -> Iterator[Path]:
    """Serialize builds of one key (threads and processes); yields the layer's final dir."""
    root = emu_dir / "layers"
    root.mkdir(parents=True, exist_ok=True)
    final = root / _dirname(key)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield final


def load(final: Path) -> Snapshot | None:
    """The snapshot of a complete layer dir, or None (a missing or torn one is removed)."""
    if not (final / "complete").exists():
        shutil.rmtree(final, ignore_errors=True)
        return None
    meta = json.loads((final / "meta.json").read_text())
    return Snapshot(
        backend=NAME,
        name=meta["name"],
        handle=str(final),
        key=meta["key"],
        data={"layers": list(meta["layers"])},
    )


def commit(
    final: Path, key: str, name: str, upper: Path | None, base: list[str], log: str
) -> Snapshot:
    """Freeze ``upper`` (moved, not copied) into ``final`` over ``base``."""
    build = final.parent / f".build-{uuid.uuid4().hex}"
    build.mkdir()
    stack = list(base)
    if upper is not None:
        upper.rename(build / "fs")
        stack.insert(0, str(final / "fs"))
    _check_depth(stack)
    (build / "provision.log").write_text(log)
    (build / "meta.json").write_text(json.dumps({"key": key, "name": name, "layers": stack}))
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
        text_out = out.decode("utf-8", "replace")
        text_err = err.decode("utf-8", "replace")
        log.append(f"$ {shown}\n{text_out}{text_err}[exit {code}]\n")
        with open(guest.dir / "boot.log", "a", encoding="utf-8") as f:
            f.write(log[-1])
        if code != 0:
            raise errors.ProvisionError(
                f"{NAME}: provision step {shown!r} of {spec.name!r} exited with {code}\n"
                f"  stdout:\n{_indent(text_out)}\n  stderr:\n{_indent(text_err)}"
            )
    return "".join(log)


def _indent(text: str, lines: int = 30) -> str:
    parts = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("    " + p for p in parts) if parts else "    (empty)"


def live_snapshot(guest: Guest, name: str, emu_dir: Path) -> Snapshot:
    """Copy a running guest's upper dir (frozen meanwhile) into a new read-only layer."""
    stack_depth = len(guest.stack) + 1
    _check_depth(["x"] * stack_depth)
    final = emu_dir / "layers" / f"snap-{uuid.uuid4().hex[:16]}"
    build = final.parent / f".build-{final.name}"
    build.mkdir(parents=True)
    frozen = False
    try:
        try:
            guest.groups.freeze(True)
            frozen = True
        except OSError:
            frozen = False  # no freezer: copy anyway (a racing writer may be half-copied)
        # cp -a never follows symlinks and keeps whiteouts (0/0 char devices) and xattrs
        subprocess.run(
            ["cp", "-a", "--", f"{guest.dir}/upper", str(build / "fs")],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(build, ignore_errors=True)
        raise errors.BackendError(
            f"{NAME}: snapshot of {guest.name!r} failed: {exc.stderr.decode(errors='replace')}"
        ) from exc
    finally:
        if frozen:
            guest.groups.freeze(False)
    stack = [str(final / "fs"), *guest.stack]
    meta: dict[str, Any] = {"key": "", "name": name, "layers": stack}
    (build / "meta.json").write_text(json.dumps(meta))
    (build / "complete").write_text(time.ctime() + "\n")
    build.rename(final)
    return Snapshot(backend=NAME, name=name, handle=str(final), key="", data={"layers": stack})


def remove(layer: Path, emu_dir: Path) -> None:
    """Delete a layer dir, only ever inside ``<state>/emulator/layers``."""
    root = (emu_dir / "layers").resolve()
    try:
        target = layer.resolve()
    except OSError:
        return
    if target.parent != root:
        raise errors.BackendError(f"{NAME}: refusing to remove {layer}: not a layer of {root}")
    shutil.rmtree(target, ignore_errors=True)
