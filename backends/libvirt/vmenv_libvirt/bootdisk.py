"""A recipe as one whole disk that BIOS firmware boots by itself: a vSphere template's disk.

Contract: :func:`ensure_bootdisk` turns a core :class:`~pytest_vmenv.images.Recipe` into a
:class:`BootDisk` under ``<state>/libvirt/images/bootdisk-<FORMAT>-<key>/``, built once per
key (:func:`.debian.built_once`: lock, progress events, renamed into place): the disk as
``disk.qcow2`` and as ``disk.vmdk``, the streamOptimized VMDK (:data:`VMDK_OPTIONS`) a
vSphere template is imported from, converted once here so an export is a copy. The disk, as
the firmware sees it:

* an MBR (syslinux's ``mbr.bin`` as its code, the partition table written here) with two
  primary partitions: 1, a FAT16 boot partition (active, from 1 MiB, :data:`BOOT_MIB`) and
  2, the ext4 root file system, made by ``mke2fs -d TREE -E offset=...`` straight into its
  region of the file;
* on the boot partition (``mformat``/``mcopy -i FILE@@OFFSET``, mtools) the kernel and
  initramfs copied from the tree's ``/boot``, ``syslinux.cfg``, and SYSLINUX installed with
  ``syslinux --install --offset``. The kernel command line is ``root=UUID=<the root fs's
  UUID>``, ``console=ttyS0`` and ``console=tty0`` (the last one is ``/dev/console``, what
  vSphere's console shows).

Why SYSLINUX and not GRUB: every step works on a regular file at an offset (mtools,
``syslinux --offset``, ``mke2fs -E offset``), so nothing is loop-mounted and no device node
is needed; GRUB's ``grub-bios-setup`` wants a block device (or a device map faking one) and
``core.img``'s embedding needs patching by hand. The cost is that the kernel the firmware
boots lives on the FAT partition: a kernel the guest installs later is not booted until it
is copied there (test templates are rebuilt, not upgraded).

The tree is the recipe plus :data:`EXPORT_PACKAGES`: Debian's generic kernel, whose
initramfs (``MODULES=most``) has the drivers of the controllers vSphere offers (LSI Logic
``mptspi``, ``vmw_pvscsi``, SATA ``ahci``, IDE ``ata_piix``) and ``vmxnet3``; the cloud
kernel of :data:`.debian.GUEST_PACKAGES` lacks ``mptspi`` and ``ahci``. ``open-vm-tools``
(guest operations of the vSphere backend) and ``openssh-server`` are in it, and
``qemu-guest-agent`` too, so the libvirt backend boots the same disk (its tests do). The
libvirt backend's own images (:mod:`.debian`) are not changed by any of this.
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pytest_vmenv.images import ImageCache, Recipe

from .debian import (
    GUEST_FILES,
    GUEST_LINKS,
    GUEST_PACKAGES,
    boot_files,
    built_once,
    copy_tree,
    guest_recipe,
    progress,
    used_mib,
    write_guest_files,
)
from .debs import run
from .tree import SafeTree

__all__ = ["BOOT_MIB", "EXPORT_PACKAGES", "MBR_CODE", "VMDK_OPTIONS", "BootDisk", "ensure_bootdisk"]

VMDK_OPTIONS = ["-O", "vmdk", "-o", "subformat=streamOptimized,adapter_type=lsilogic"]
"""``qemu-img convert``'s options for the VMDK vSphere imports (compressed, sequential)."""

EXPORT_PACKAGES = (
    *(p for p in GUEST_PACKAGES if p != "linux-image-cloud-amd64"),
    "linux-image-amd64",
    "open-vm-tools",
)
"""The guest packages of an exported disk (the one place): see the module docstring."""

FORMAT = "1"
"""The layout of the disk: bumped when the partitions, the loader or the guest files change."""
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
MIB = 1024 * 1024
BOOT_MIB = 128
"""The FAT boot partition: the kernel and the generic initramfs with room to spare."""
_SECTOR = 512
_ROOT_START = (1 + BOOT_MIB) * MIB

_SYSLINUX = """SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND {cmdline}
"""
_ENABLED = {  # what the packages' postinst enables, made sure of
    "etc/systemd/system/multi-user.target.wants/open-vm-tools.service":
        "/lib/systemd/system/open-vm-tools.service",
    "etc/systemd/system/multi-user.target.wants/ssh.service":
        "/lib/systemd/system/ssh.service",
}  # fmt: skip


@dataclass(frozen=True)
class BootDisk:
    """A built whole disk (qcow2): MBR, FAT boot partition with SYSLINUX, ext4 root."""

    dir: Path
    disk: Path
    vmdk: Path
    key: str
    root_uuid: str
    cmdline: str


def cmdline(root_uuid: str) -> str:
    """The kernel command line SYSLINUX boots with."""
    return f"root=UUID={root_uuid} ro console=ttyS0,115200n8 console=tty0 panic=-1"


def _mbr(raw: Path, boot_sectors: int, root_sectors: int) -> None:
    """Sector 0: ``mbr.bin``'s code, a disk id, partition 1 (FAT16 LBA, active) and 2 (Linux)."""
    code = MBR_CODE.read_bytes()
    if len(code) > 440:
        raise RuntimeError(f"{MBR_CODE} is {len(code)} bytes, not the 440 of MBR boot code")
    chs = b"\xfe\xff\xff"  # "use the LBA fields": every loader involved reads them
    entries = [
        struct.pack("<B3sB3sII", 0x80, chs, 0x0E, chs, MIB // _SECTOR, boot_sectors),
        struct.pack("<B3sB3sII", 0x00, chs, 0x83, chs, _ROOT_START // _SECTOR, root_sectors),
    ]
    disk_id = uuid.uuid4().int & 0xFFFFFFFF
    sector = code.ljust(440, b"\0") + struct.pack("<IH", disk_id, 0)
    sector += b"".join(entries).ljust(64, b"\0") + b"\x55\xaa"
    with open(raw, "r+b") as f:
        f.write(sector)


def _boot_partition(raw: Path, files: Path, root_uuid: str) -> None:
    """Partition 1: a FAT file system holding ``files``' kernel and initramfs, the
    configuration, and SYSLINUX; all through mtools at the partition's offset."""
    part = f"{raw}@@{MIB}"
    sectors = BOOT_MIB * MIB // _SECTOR
    run(["mformat", "-i", part, "-T", str(sectors), "-h", "64", "-s", "32",
         "-H", str(MIB // _SECTOR), "-v", "VMENVBOOT", "::"])  # fmt: skip
    (files / "syslinux.cfg").write_text(_SYSLINUX.format(cmdline=cmdline(root_uuid)))
    for name in ("vmlinuz", "initrd.img", "syslinux.cfg"):
        run(["mcopy", "-i", part, str(files / name), f"::/{name}"])
    run(["syslinux", "--install", "--offset", str(MIB), str(raw)])


def _whole_disk(root: Path, files: Path, raw: Path, root_uuid: str) -> None:
    """The disk as raw: MBR, boot partition, and ``root`` as ext4 in partition 2."""
    root_mib = max(2048, used_mib(root) * 2 + 512)
    with open(raw, "wb") as f:
        f.truncate(_ROOT_START + root_mib * MIB)
    _mbr(raw, BOOT_MIB * MIB // _SECTOR, root_mib * MIB // _SECTOR)
    _boot_partition(raw, files, root_uuid)
    run(["mkfs.ext4", "-q", "-F", "-L", "vmenv-root", "-U", root_uuid, "-d", str(root),
         "-E", f"offset={_ROOT_START},nodiscard,lazy_itable_init=1,lazy_journal_init=1",
         str(raw), f"{root_mib}M"])  # fmt: skip


def _authorize(root: Path, keys: str) -> None:
    """``keys`` as root's authorized_keys in the tree ``root`` (link-safely, 0700/0600)."""
    tree = SafeTree.existing(root)
    try:
        tree.mkdir("root/.ssh", 0o700)
        tree.replace("root/.ssh/authorized_keys", keys.encode(), 0o600)
    finally:
        tree.close()


def _build(
    cache: ImageCache, recipe: Recipe, key: str, work: Path, out: Path, authorized_keys: str
) -> None:
    started = time.monotonic()

    def say(step: str) -> None:
        progress(recipe, key, "bootable disk", step, started)

    root = copy_tree(cache, recipe, work, say)
    root_uuid = str(uuid.uuid4())
    say("writing the guest's files")
    fstab = f"UUID={root_uuid} / ext4 rw,errors=remount-ro 0 1\n"
    files = {**GUEST_FILES, "etc/fstab": fstab}
    write_guest_files(root, files, {**GUEST_LINKS, **_ENABLED})
    if authorized_keys:
        _authorize(root, authorized_keys)
    (work / "boot").mkdir()
    boot_files(root, work / "boot")
    say("partitioning; the boot partition (SYSLINUX) and the ext4 root file system")
    _whole_disk(root, work / "boot", work / "disk.raw", root_uuid)
    say("converting the disk to qcow2")
    raw = ["qemu-img", "convert", "-q", "-f", "raw", str(work / "disk.raw")]
    run([*raw, "-O", "qcow2", str(out / "disk.qcow2")])
    say("converting the disk to a streamOptimized VMDK")
    run([*raw, *VMDK_OPTIONS, str(out / "disk.vmdk")])
    (out / "root-uuid").write_text(root_uuid + "\n")


def ensure_bootdisk(
    state_dir: Path, images_dir: Path, recipe: Recipe, authorized_keys: str = ""
) -> BootDisk:
    """The bootable disk of ``recipe`` (plus :data:`EXPORT_PACKAGES`), built if this host
    has none: see the module docstring. ``state_dir`` holds the core's trees.

    ``authorized_keys`` (OpenSSH public key lines) become root's ``~/.ssh/authorized_keys``:
    the disk has no other login (root has no password), and the vSphere backend reaches its
    clones over SSH with the matching private key. They are part of the key of the disk."""
    cache = ImageCache(state_dir)
    full = guest_recipe(recipe, EXPORT_PACKAGES)
    key = cache.key(full)
    if authorized_keys:
        key = hashlib.sha256(f"{key}\n{authorized_keys}".encode()).hexdigest()[: len(key)]
    final = built_once(images_dir, f"bootdisk-{FORMAT}-{key}", full, key, "bootable disk",
                       lambda work, out: _build(cache, full, key, work, out,
                                                authorized_keys))  # fmt: skip
    root_uuid = (final / "root-uuid").read_text().strip()
    return BootDisk(final, final / "disk.qcow2", final / "disk.vmdk", key, root_uuid,
                    cmdline(root_uuid))  # fmt: skip
