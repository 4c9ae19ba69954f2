"""The built-in ``tiny`` image, built on first use from Debian packages only.

Contract: :func:`ensure_tiny` returns a complete :class:`TinyImage` under
``<state>/libvirt/images/<variant>-<recipe>/``, building it once (a file lock serialises
processes; a torn build is discarded and redone). Packages come from ``apt-get download``
(the host's configured Debian mirror, see :mod:`.debs`), never from anywhere else:

* ``linux-image-cloud-amd64``'s kernel. Virtio is modules there, so an initramfs (a cpio
  built in memory) loads them in dependency order, mounts ``/dev/vda`` and ``switch_root``s.
  With ``vmenv.probe=1`` on the command line it only prints a marker and powers off: that is
  the KVM probe of :mod:`.accel`.
* a root filesystem of ``busybox-static`` plus the variant's command channel (see
  :mod:`.tinyroot`: qemu-ga, or with ``ssh=True`` dropbear and no agent), written through
  :class:`.tree.SafeTree` (never through a symlink), made with ``mkfs.ext4 -d`` and
  converted to qcow2 (about 9 MiB).

Why not a cloud image: nothing may be fetched from the internet, and this boots in ~4 s under
TCG where a systemd image takes a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_vmenv.ledger import flocked

from .debs import TinyBuildError, download, extract, run
from .tinyroot import AGENT, READY_MARKER, SSH, Variant, write_rootfs
from .tree import SafeTree, cpio_newc

__all__ = [
    "CMDLINE",
    "MODULES",
    "PROBE_MARKER",
    "READY_MARKER",
    "TinyBuildError",
    "TinyImage",
    "ensure_tiny",
]

KERNEL = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
MODULES = (  # in load order: each needs the ones before it
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
)
CMDLINE = (
    "console=ttyS0 root=/dev/vda rw quiet panic=-1 mitigations=off tsc=reliable "
    "no_timer_check acpi=off i8042.noaux i8042.nokbd 8250.nr_uarts=1"
)
PROBE_MARKER = "vmenv: kvm probe ok"

_INIT = f"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
$B mount -t proc proc /proc
case " $($B cat /proc/cmdline) " in
  *" vmenv.probe=1 "*) echo "{PROBE_MARKER}" >/dev/console; $B poweroff -f;;
esac
for m in {" ".join(MODULES)}; do
  $B insmod /lib/modules/$m.ko || echo "vmenv-initramfs: insmod $m failed" >/dev/console
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do $B usleep 10000; i=$((i+1)); done
$B mount -t ext4 -o rw /dev/vda /newroot || {{
  echo "vmenv-initramfs: cannot mount /dev/vda" >/dev/console; $B poweroff -f; }}
$B mount --move /dev /newroot/dev
$B umount /proc
exec $B switch_root /newroot /sbin/init
"""


@dataclass(frozen=True)
class TinyImage:
    """The built image: direct-boot kernel + initramfs, and the qcow2 root disk."""

    dir: Path
    kernel: Path
    initrd: Path
    disk: Path
    cmdline: str = CMDLINE

    @classmethod
    def at(cls, d: Path) -> TinyImage:
        return cls(d, d / "vmlinuz", d / "initrd.img", d / "rootfs.qcow2")


def _initramfs(kernel_root: Path, busybox: bytes) -> bytes:
    mods = list((kernel_root / "lib" / "modules").glob("*/kernel"))
    if not mods:
        raise TinyBuildError("the kernel package has no modules")
    entries: list[tuple[str, int, bytes | str | tuple[int, int]]] = [
        (d, stat.S_IFDIR | 0o755, b"")
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")
    ]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, (5, 1)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, "busybox"))
    entries.append(("init", stat.S_IFREG | 0o755, _INIT.encode()))
    for name in MODULES:
        found = list(mods[0].rglob(f"{name}.ko*"))
        if not found or found[0].suffix != ".ko":
            raise TinyBuildError(f"module {name}.ko not found (or compressed) in the kernel")
        entries.append((f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, found[0].read_bytes()))
    return cpio_newc(entries)


def _kernel(debs: dict[str, Path], work: Path, out: Path, busybox: Path) -> None:
    """The kernel ``KERNEL`` depends on, as ``vmlinuz``, and the initramfs for its modules."""
    depends = run(["dpkg-deb", "-f", str(debs[KERNEL]), "Depends"])
    match = re.search(r"linux-image-[0-9][^\s,(]*", depends)
    if match is None:
        raise TinyBuildError(f"{KERNEL} depends on no kernel: {depends}")
    debs.update(download([match.group(0)], work / "kdebs"))
    kroot = extract(debs[match.group(0)], work / "x-kernel")
    vmlinuz = next((kroot / "boot").glob("vmlinuz-*"), None)
    if vmlinuz is None:
        raise TinyBuildError(f"{match.group(0)} has no /boot/vmlinuz-*")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    (out / "initrd.img").write_bytes(_initramfs(kroot, busybox.read_bytes()))


def _disk(root: Path, raw: Path, qcow2: Path) -> None:
    """The ext4 file system of the tree ``root``, as the qcow2 ``qcow2``."""
    run(["mkfs.ext4", "-q", "-F", "-L", "vmenv-tiny", "-d", str(root),
         "-E", "lazy_itable_init=1,lazy_journal_init=1", str(raw), "256M"])  # fmt: skip
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])


def _build(variant: Variant, work: Path, out: Path) -> dict[str, str]:
    """Build ``variant`` into the empty ``out`` (scratch in ``work``); package -> .deb name."""
    debs = download([KERNEL, BUSYBOX, *variant.packages], work / "debs")
    busybox = extract(debs[BUSYBOX], work / "x-busybox") / "bin" / "busybox"
    _kernel(debs, work, out, busybox)
    roots = [extract(debs[p], work / f"x-{p}") for p in variant.packages]
    tree = SafeTree(work / "root")
    try:
        write_rootfs(tree, busybox, variant, roots)
    finally:
        tree.close()
    _disk(work / "root", work / "rootfs.raw", out / "rootfs.qcow2")
    return {p: d.name for p, d in debs.items()}


def ensure_tiny(images_dir: Path, ssh: bool = False) -> TinyImage:
    """The tiny image, built now if this state dir has none (see the module docstring).

    ``ssh``: the variant with dropbear and no guest agent, ``tiny-ssh-*``.
    """
    variant = SSH if ssh else AGENT
    images_dir.mkdir(parents=True, exist_ok=True)
    final = images_dir / variant.dirname
    if (final / "meta.json").exists():
        return TinyImage.at(final)
    with flocked(images_dir / f"{variant.dirname}.lock"):
        if (final / "meta.json").exists():
            return TinyImage.at(final)
        start = time.monotonic()
        work = images_dir / f"{variant.dirname}.build"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        work.mkdir()
        try:
            (work / "out").mkdir()
            versions = _build(variant, work, work / "out")
            os.rename(work / "out", final)
            meta = {
                "recipe": variant.recipe,
                "packages": versions,
                "seconds": time.monotonic() - start,
                "created": time.time(),
            }
            (final / "meta.json").write_text(json.dumps(meta, indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for f in final.iterdir():
            f.chmod(0o644)
        return TinyImage.at(final)
