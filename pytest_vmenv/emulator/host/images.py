"""Images: what a guest's bottom layers are, and how a tarball becomes a rootfs safely.

* a recipe (``"debian-12"``, ``[images.NAME] base = ...``): the tree built from the Debian
  archive, shared by every backend (``<state>/images/<key>/rootfs``, see
  :mod:`pytest_vmenv.images`), used as the bottom layer as it is;
* ``"host"``: a read-only view of the host's ``/`` (:data:`..guest.mounts.HOST_BASE`, mounted per
  guest), under a *mask layer* of opaque directories so that the host's ``/tmp``, ``/run``,
  home directories and pytest-vmenv's state dirs look empty (and stay writable in the
  guest), and without the host's credentials (below).
* a rootfs directory: used as the bottom layer as it is (never written: overlay writes go to
  the guest's upper dir).
* a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz`` file: unpacked once into
  ``<state>/emulator/images/<sha256>/rootfs``, by a separate Python process that has
  ``chroot``-ed into that directory first: whatever the archive says (``..`` or absolute
  names, a symlink followed by a write through it, a hard link to ``/etc/passwd``), every
  path resolves inside the rootfs. No path check can be fooled (such checks in ``tarfile``
  had bypasses, e.g. CVE-2025-4517). Symlinks are kept as they are (absolute ones too: they
  are resolved inside the guest); device nodes and FIFOs are skipped; setuid and setgid bits
  are dropped from files. Unprivileged, that process enters a user namespace (where it is
root) before ``chroot``; files of owners other than root become the caller's.

The host image's mask layer is :mod:`.hostmask`; the check that a rootfs can run what a
spec runs in it is :mod:`.imagecheck`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable, ConfigError
from ..guest.mounts import HOST_BASE
from . import userns
from .hostmask import mask_layer

__all__ = ["base_stack", "is_host", "unpack_tarball"]

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")

# Runs as ``python -I -S -c``: open the archive, chroot into the destination, extract.
_EXTRACT = r"""
import os, sys, tarfile
for mod in ("gzip", "bz2", "lzma", "zlib", "copy", "grp", "pwd"):
    try:
        __import__(mod)
    except ImportError:
        pass
def keep(member, _path="/"):
    if member.isdev():  # character and block devices, FIFOs
        return None
    if not member.isdir():
        member.mode &= ~0o6000
    return member
def userns():  # unprivileged: chroot inside a user namespace where we are root
    import ctypes
    uid, gid = os.getuid(), os.getgid()
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1\n" % uid),
                       ("gid_map", "0 %d 1\n" % gid)):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
try:
    tar = tarfile.open(sys.argv[1])
    if len(sys.argv) > 3:
        userns()
        chown = tar.chown
        def lenient(*args, **kwargs):  # only uid/gid 0 exist: other owners become ours
            try:
                chown(*args, **kwargs)
            except tarfile.ExtractError:
                pass
        tar.chown = lenient
    os.chroot(sys.argv[2])
    os.chdir("/")
    with tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall("/", numeric_owner=True, filter=keep)
        else:  # Python < 3.11.4: no filter argument
            tar.extractall("/", members=[m for m in tar if keep(m)], numeric_owner=True)
except Exception as exc:
    print("%s: %s" % (type(exc).__name__, exc), file=sys.stderr)
    sys.exit(1)
"""


def _extract(tarball: Path, dest: Path) -> None:
    """Unpack ``tarball`` into ``dest`` in a child process confined to it by ``chroot``."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _EXTRACT, str(tarball), str(dest)]
        + (["userns"] if userns.rootless() else []),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OSError(detail[-1] if detail else f"the unpacker exited with {proc.returncode}")


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
        userns.rmtree(final)
        rootfs = final / "rootfs"
        rootfs.mkdir(parents=True)
        os.chmod(final, 0o700)
        try:
            _extract(tarball, rootfs.resolve())
        except OSError as exc:
            userns.rmtree(final)
            raise ConfigError(f"emulator: cannot unpack image {str(tarball)!r}: {exc}") from exc
        (final / "complete").write_text(str(tarball) + "\n")
    return rootfs


def is_host(spec_image: str, image_config: Mapping[str, Any]) -> bool:
    """Whether an image is the built-in ``"host"`` (not a config entry of that name)."""
    return spec_image == "host" and not image_config


def base_stack(
    spec_image: str, image_config: Mapping[str, Any], emu_dir: Path, state: Path
) -> list[str]:
    """The bottom of a guest's layer stack (top first) for an image (a recipe's is its built
    tree: see :meth:`pytest_vmenv.images.ImageCache.using`)."""
    rootfs = image_config.get("rootfs")
    if is_host(spec_image, image_config):
        if userns.rootless():
            raise BackendUnavailable("emulator", userns.HOST_REASON)
        return [str(mask_layer(emu_dir, state)), HOST_BASE]
    candidate = Path(str(rootfs if rootfs is not None else spec_image)).expanduser()
    if candidate.is_dir():
        return [str(candidate.resolve())]
    if candidate.is_file() and candidate.name.endswith(_TAR_SUFFIXES):
        return [str(unpack_tarball(candidate.resolve(), emu_dir))]
    raise ConfigError(
        f"emulator: image {spec_image!r} (rootfs={rootfs!r}) is neither 'host', a rootfs "
        f"directory nor a tarball ({', '.join(_TAR_SUFFIXES)}). Choose one of: 'host', "
        "'debian-12', a path to a rootfs directory or tarball, or [tool.vmenv.images.NAME] "
        "emulator = { rootfs = PATH }"
    )
