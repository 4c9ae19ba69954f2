"""Images: what a guest's bottom layers are, and how a tarball becomes a rootfs safely.

* ``"host"``: a read-only view of the host's ``/`` (:data:`rootfs.HOST_BASE`, mounted per
  guest), under a *mask layer* of opaque directories so that the host's ``/tmp``, ``/run``,
  home directories and the plugin's state dir look empty (and stay writable in the guest).
* a rootfs directory: used as the bottom layer as it is (never written: overlay writes go to
  the guest's upper dir).
* a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz`` file: unpacked once into
  ``<state>/emulator/images/<sha256>/rootfs``. Extraction refuses absolute or ``..``
  member names, any member whose destination resolves outside the rootfs (through a symlink
  unpacked earlier, for instance) and hard links pointing outside; symlinks themselves are
  kept as they are (absolute ones too: they are resolved inside the guest). Device nodes are
  skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tarfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .rootfs import HOST_BASE

__all__ = ["base_stack", "unpack_tarball"]

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
MASKED = ("tmp", "run", "home", "root", "var/tmp")


def _opaque_dir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def mask_layer(emu_dir: Path, state: Path) -> Path:
    """The layer that hides the host's private directories (built once per state dir)."""
    hidden = list(MASKED)
    with contextlib.suppress(ValueError):
        hidden.append(str(state.resolve().relative_to("/")))
    digest = hashlib.sha256("\0".join(hidden).encode()).hexdigest()[:16]
    final = emu_dir / "layers" / f"mask-{digest}"
    if (final / "complete").exists():
        return final / "fs"
    build = emu_dir / "layers" / f".build-{uuid.uuid4().hex}"
    fs = build / "fs"
    fs.mkdir(parents=True)
    for rel in hidden:
        _opaque_dir(fs / rel, 0o1777 if rel in ("tmp", "var/tmp") else 0o755)
        if rel == "root":
            os.chmod(fs / rel, 0o700)
        # parents made on the way keep the host's modes, so the view is unchanged above
        parent = Path(rel).parent
        while str(parent) != ".":
            with contextlib.suppress(OSError):
                os.chmod(fs / parent, os.stat(Path("/") / parent).st_mode & 0o7777)
            parent = parent.parent
    (build / "complete").write_text("mask\n")
    try:
        build.rename(final)
    except OSError:
        shutil.rmtree(build, ignore_errors=True)  # another thread or process won the race
    return final / "fs"


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's ``tar`` filter for path checks, but keeping modes and owners of a rootfs."""
    if member.ischr() or member.isblk():
        return None
    checked = tarfile.tar_filter(member, dest)  # raises on escapes, strips leading "/"
    if member.islnk():
        target = os.path.realpath(os.path.join(dest, member.linkname))
        if os.path.commonpath([target, dest]) != dest:
            raise tarfile.LinkOutsideDestinationError(member, target)
    return member.replace(name=checked.name, deep=False)


def unpack_tarball(tarball: Path, emu_dir: Path) -> Path:
    """Unpack ``tarball`` once (keyed by its content hash) and return the rootfs directory."""
    h = hashlib.sha256()
    with open(tarball, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    images = emu_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    final = images / h.hexdigest()[:32]
    if (final / "complete").exists():
        return final / "rootfs"
    with open(images / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "complete").exists():
            return final / "rootfs"
        shutil.rmtree(final, ignore_errors=True)
        rootfs = final / "rootfs"
        rootfs.mkdir(parents=True)
        dest = str(rootfs.resolve())
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(dest, numeric_owner=True, filter=lambda m, _p: _safe_member(m, dest))
        except (tarfile.TarError, OSError) as exc:
            shutil.rmtree(final, ignore_errors=True)
            raise ConfigError(f"emulator: cannot unpack image {str(tarball)!r}: {exc}") from exc
        (final / "complete").write_text(str(tarball) + "\n")
    return rootfs


def base_stack(
    spec_image: str, image_config: Mapping[str, Any], emu_dir: Path, state: Path
) -> list[str]:
    """The bottom of a guest's layer stack (top first) for an image."""
    rootfs = image_config.get("rootfs")
    if rootfs is None and spec_image == "host" and not image_config:
        return [str(mask_layer(emu_dir, state)), HOST_BASE]
    candidate = Path(str(rootfs if rootfs is not None else spec_image)).expanduser()
    if candidate.is_dir():
        return [str(candidate.resolve())]
    if candidate.is_file() and candidate.name.endswith(_TAR_SUFFIXES):
        return [str(unpack_tarball(candidate.resolve(), emu_dir))]
    raise ConfigError(
        f"emulator: image {spec_image!r} (rootfs={rootfs!r}) is neither 'host', a rootfs "
        f"directory nor a tarball ({', '.join(_TAR_SUFFIXES)}). Choose one of: 'host', a path "
        "to a rootfs directory or tarball, or [tool.vmenv.images.NAME] emulator = "
        "{ rootfs = PATH }"
    )
