"""A guest's own size-limited filesystem: what makes ``disk=`` a limit in the emulator.

With ``disk=N`` a guest's overlay upper and work dirs live on an ext4 filesystem of N bytes
(no journal, no reserved blocks; its metadata takes a few percent) in a sparse image file
``<guestdir>/disk.img`` on a loop device, mounted at ``<guestdir>/disk``. A write past it
fails with ENOSPC inside the guest, and the host's disk pays for what the guest wrote, never
more than N. ``disk`` bounds what a machine writes, not the image it starts from (the
read-only layers are shared by every clone).

The mount is in the host's mount namespace, in the guest's 0700 dir: the backend reads the
upper dir from there for snapshots and templates, and :func:`detach` (called by every
destroy, from any process) lazily unmounts it. The loop device is set up with autoclear, so
it goes away by itself once the last user of the filesystem (the guest's own copy of the
mount) is gone.

Cost, paid only by machines with ``disk=``: one ``mkfs.ext4`` per distinct size, cached in
``<state>/emulator/disks/`` (about 10 ms), then per clone a sparse copy of that image (a few
hundred KiB of metadata), a ``LOOP_CONFIGURE`` and a ``mount(2)``, and at destroy an unmount
and the image's removal: a few ms in all. The filesystem is throwaway, so it is mounted
without flushes to the host's disk (``barrier=0``) and without background zeroing of its
inode tables (``noinit_itable``: they read as zeros from the sparse image anyway).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import struct
import subprocess
from pathlib import Path

from .. import syscalls

__all__ = ["MIN_SIZE", "attach", "detach", "unavailable", "upper_dir"]

MIN_SIZE = 1024 * 1024
"""The smallest ``disk=`` the emulator makes (ext4 needs room for its own metadata)."""

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LOOP_SET_FD = 0x4C00
_LOOP_SET_STATUS64 = 0x4C04
_LO_FLAGS_AUTOCLEAR = 4
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")  # struct loop_info64
_MOUNT_OPTIONS = "barrier=0,noinit_itable"
_MKFS = (
    "mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0",
    "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0",
)  # fmt: skip


@functools.cache
def unavailable() -> str | None:
    """Why ``disk=`` cannot be enforced on this host (as root), or None if it can."""
    if shutil.which("mkfs.ext4") is None:
        return "disk= needs mkfs.ext4 on the host (install e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "disk= needs loop devices (/dev/loop-control is missing; `modprobe loop`)"
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            if "ext4" not in f.read().split():
                return "disk= needs ext4 in the kernel (`modprobe ext4`)"
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    return None


def mountpoint(gdir: Path) -> Path:
    return gdir / "disk"


def attached(gdir: Path) -> bool:
    return os.path.ismount(mountpoint(gdir))


def upper_dir(gdir: Path) -> Path:
    """The guest's overlay upper dir: on its own filesystem if it has one."""
    return mountpoint(gdir) / "upper" if attached(gdir) else gdir / "upper"


def _formatted(cache: Path, size: int) -> Path:
    """An empty ext4 image of ``size`` bytes, made once per size (file lock, atomic rename)."""
    image = cache / f"ext4-{size}.img"
    if image.exists():
        return image
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.exists():
            return image
        tmp = cache / f".{image.name}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.truncate(size)
        try:
            subprocess.run([*_MKFS, str(tmp)], check=True, capture_output=True, timeout=60)
        except subprocess.CalledProcessError as exc:
            tmp.unlink(missing_ok=True)
            detail = exc.stderr.decode(errors="replace").strip()
            raise OSError(errno.EIO, f"mkfs.ext4 of a {size}-byte disk failed: {detail}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.rename(image)
    return image


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new ``dst``, its holes as holes (SEEK_DATA/SEEK_HOLE)."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            while data < hole:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), hole - data, data, data)
                if done <= 0:
                    break
                data += done
            pos = hole
        fout.truncate(size)


def _loop_attach(image: Path) -> tuple[str, int]:
    """Bind ``image`` to a free loop device (autoclear); its path and an open descriptor.

    Autoclear unbinds the device at its last close: keep the descriptor until the
    filesystem is mounted (the mount then holds the device).
    """
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        with open("/dev/loop-control", "rb", buffering=0) as ctl:
            for _attempt in range(16):  # another process may take the free device first
                number = fcntl.ioctl(ctl.fileno(), _LOOP_CTL_GET_FREE)
                path = f"/dev/loop{number}"
                dev = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    _configure(dev, backing)
                    return path, dev
                except OSError as exc:
                    os.close(dev)
                    if exc.errno != errno.EBUSY:
                        raise
        raise OSError(errno.EBUSY, "no free loop device (16 attempts)")
    finally:
        os.close(backing)


def _configure(dev: int, backing: int) -> None:
    info = _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR, b"", b"", b"", 0, 0)
    config = struct.pack("=II", backing, 0) + info + bytes(64)
    try:
        fcntl.ioctl(dev, _LOOP_CONFIGURE, config)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):  # before Linux 5.8
            raise
    fcntl.ioctl(dev, _LOOP_SET_FD, backing)
    try:
        fcntl.ioctl(dev, _LOOP_SET_STATUS64, info)
    except OSError:
        with contextlib.suppress(OSError):
            fcntl.ioctl(dev, 0x4C01)  # LOOP_CLR_FD
        raise


def attach(gdir: Path, size: int, cache: Path) -> tuple[Path, Path]:
    """Mount a fresh ``size``-byte filesystem for ``gdir``; its (upper, work) dirs.

    A filesystem that is already mounted (a revert) is kept, its upper and work dirs made
    empty.
    """
    mnt = mountpoint(gdir)
    upper, work = mnt / "upper", mnt / "work"
    if attached(gdir):
        for sub in (upper, work):
            shutil.rmtree(sub, ignore_errors=True)
    else:
        image = gdir / "disk.img"
        image.unlink(missing_ok=True)
        _sparse_copy(_formatted(cache, size), image)
        mnt.mkdir(mode=0o700, exist_ok=True)
        dev, fd = _loop_attach(image)
        try:
            syscalls.mount(
                dev, str(mnt), "ext4", syscalls.MS_NOSUID | syscalls.MS_NODEV, _MOUNT_OPTIONS
            )
        finally:
            os.close(fd)  # unmounted or never mounted: autoclear unbinds the device
        shutil.rmtree(mnt / "lost+found", ignore_errors=True)
    for sub in (upper, work):
        sub.mkdir(mode=0o755)
    return upper, work


def detach(gdir: Path) -> None:
    """Unmount ``gdir``'s filesystem if it has one (lazily: a live guest keeps its copy)."""
    mnt = mountpoint(gdir)
    while os.path.ismount(mnt):
        try:
            syscalls.umount2(str(mnt), syscalls.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise
