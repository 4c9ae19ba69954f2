"""Built Debian images (``image="debian-12"``, ``[images.NAME] base = ...``) as bootable qcow2s.

Contract: :func:`ensure_debian` turns a core :class:`~pytest_vmenv.images.Recipe` into a
:class:`DebianImage` under ``<state>/libvirt/images/debian-<key>/`` (``vmlinuz``,
``initrd.img``, ``rootfs.qcow2``, ``meta.json``), built once per key:

* the tree is the core's (:class:`~pytest_vmenv.images.ImageCache`, mmdebstrap) for the
  recipe plus :data:`GUEST_PACKAGES`, what a machine under QEMU needs (Debian's cloud
  kernel, udev, qemu-guest-agent, openssh-server). Those packages are part of the recipe, so
  the key differs from the emulator's tree of the same declaration;
* the tree is copied (``cp -a``: links stay links), :data:`GUEST_FILES` are written into the
  copy through :class:`.tree.SafeTree` (never through a link), and the copy becomes an ext4
  file system (``mkfs.ext4 -d``) converted to qcow2, exactly as ``tiny`` is made;
* the machine boots Debian's own kernel and initramfs (the tree's ``/boot/vmlinuz-*`` and
  ``/boot/initrd.img-*``) directly, ``root=/dev/vda``, systemd as init. The hostname is set
  by ``systemd.hostname=`` on the command line (cold boots) and through the agent (every
  boot, RAM-state clones included), as for ``tiny``.

The image dir lives beside the tiny images (shared by CI checkouts, see ``.ci/test-all``);
a finished one needs no tree, so a cache hit builds nothing. Builds of one key are
serialized by a lock beside it; the core's tree is held (shared lock) while it is copied.
Progress goes through the core's events (:func:`pytest_vmenv.images.publish`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_vmenv.images import BuildEvent, ImageCache, Recipe, publish
from pytest_vmenv.ledger import flocked

from .debs import run
from .tree import SafeTree

__all__ = [
    "CMDLINE",
    "GUEST_FILES",
    "GUEST_PACKAGES",
    "DebianImage",
    "ensure_debian",
    "guest_recipe",
]

GUEST_PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "qemu-guest-agent",
    "openssh-server",
    "iproute2",
    "zstd",
)
"""What a built Debian image needs under QEMU, on top of its recipe (the one place)."""

CMDLINE = (
    "console=ttyS0 root=/dev/vda rw panic=-1 mitigations=off tsc=reliable no_timer_check "
    "systemd.show_status=false"
)
FORMAT = "1"
"""The layout of the qcow2 made from a tree: bumped when :data:`GUEST_FILES` or the disk
changes (it is part of the image dir's name)."""

_NETWORK = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
"""
GUEST_FILES: dict[str, str] = {
    # DHCP on every virtio NIC; by MAC, since clones of one template share a machine-id
    "etc/systemd/network/50-vmenv-dhcp.network": _NETWORK,
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
}
GUEST_LINKS: dict[str, str] = {
    "etc/systemd/system/multi-user.target.wants/systemd-networkd.service":
        "/lib/systemd/system/systemd-networkd.service",
    "etc/systemd/system/sockets.target.wants/systemd-networkd.socket":
        "/lib/systemd/system/systemd-networkd.socket",
    # a machine without a NIC (template builds, RAM-state clones) would wait 2 min for it
    "etc/systemd/system/systemd-networkd-wait-online.service": "/dev/null",
    # nothing in a test machine should start apt or man-db on a timer
    "etc/systemd/system/apt-daily.timer": "/dev/null",
    "etc/systemd/system/apt-daily-upgrade.timer": "/dev/null",
}  # fmt: skip


@dataclass(frozen=True)
class DebianImage:
    """A built image: Debian's kernel and initramfs for direct boot, and the qcow2 root disk."""

    dir: Path
    kernel: Path
    initrd: Path
    disk: Path
    key: str
    cmdline: str = CMDLINE

    @classmethod
    def at(cls, d: Path, key: str) -> DebianImage:
        return cls(d, d / "vmlinuz", d / "initrd.img", d / "rootfs.qcow2", key)


def guest_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` with :data:`GUEST_PACKAGES`: the tree a libvirt machine boots."""
    return Recipe(recipe.base, recipe.packages + GUEST_PACKAGES, recipe.init)


def _progress(recipe: Recipe, key: str, step: str, started: float, state: str = "building") -> None:
    publish(
        BuildEvent(f"{recipe.describe()} as qcow2", key, state, step, time.monotonic() - started)
    )


def _boot_files(tree: Path, out: Path) -> None:
    """The tree's newest ``/boot/vmlinuz-*`` and its ``initrd.img-*``, copied to ``out``."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise RuntimeError(f"{tree}/boot has no vmlinuz-*: the kernel package is missing")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = tree / "boot" / f"initrd.img-{version}"
    if initrd.is_symlink() or kernels[-1].is_symlink() or not initrd.is_file():
        raise RuntimeError(f"{tree}/boot has no initrd.img-{version} (a regular file)")
    shutil.copyfile(kernels[-1], out / "vmlinuz")
    shutil.copyfile(initrd, out / "initrd.img")


def _write_guest_files(root: Path) -> None:
    """:data:`GUEST_FILES` and :data:`GUEST_LINKS` into the copied tree ``root``, link-safely."""
    tree = SafeTree.existing(root)
    try:
        for rel, text in GUEST_FILES.items():
            tree.replace(rel, text.encode())
        for rel, target in GUEST_LINKS.items():
            tree.replace_link(target, rel)
    finally:
        tree.close()


def _disk(root: Path, raw: Path, qcow2: Path) -> None:
    """The ext4 file system of ``root`` (sized to hold it, with room to spare) as ``qcow2``."""
    used = int(subprocess.run(["du", "-sxm", str(root)], capture_output=True, text=True,
                              check=True).stdout.split()[0])  # fmt: skip
    size = max(2048, used * 2 + 512)
    run(["mkfs.ext4", "-q", "-F", "-L", "vmenv-debian", "-d", str(root),
         "-E", "lazy_itable_init=1,lazy_journal_init=1", str(raw), f"{size}M"])  # fmt: skip
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])


def _build(cache: ImageCache, recipe: Recipe, key: str, work: Path, out: Path) -> None:
    started = time.monotonic()
    with cache.using(recipe) as tree:
        _progress(recipe, key, "copying the tree", started)
        run(["cp", "-a", "--reflink=auto", "--", str(tree), str(work / "root")])
    _progress(recipe, key, "writing the guest's files", started)
    _write_guest_files(work / "root")
    _boot_files(work / "root", out)
    _progress(recipe, key, "making the ext4 file system and the qcow2", started)
    _disk(work / "root", work / "rootfs.raw", out / "rootfs.qcow2")


def ensure_debian(state_dir: Path, images_dir: Path, recipe: Recipe) -> DebianImage:
    """The qcow2 image of ``recipe`` (plus :data:`GUEST_PACKAGES`), built if this host has
    none: see the module docstring. ``state_dir`` holds the core's trees."""
    cache = ImageCache(state_dir)
    full = guest_recipe(recipe)
    key = cache.key(full)
    images_dir.mkdir(parents=True, exist_ok=True)
    final = images_dir / f"debian-{FORMAT}-{key}"
    if (final / "meta.json").exists():
        return DebianImage.at(final, key)
    with flocked(images_dir / f"debian-{FORMAT}-{key}.lock"):
        if (final / "meta.json").exists():
            return DebianImage.at(final, key)
        started = time.monotonic()
        work = images_dir / f"debian-{FORMAT}-{key}.build"
        for stale in (work, final):
            run(["rm", "-rf", "--one-file-system", "--", str(stale)])
        (work / "out").mkdir(parents=True)
        try:
            _build(cache, full, key, work, work / "out")
            os.rename(work / "out", final)
        except BaseException:
            _progress(full, key, "failed", started, "failed")
            raise
        finally:
            run(["rm", "-rf", "--one-file-system", "--", str(work)])
        seconds = time.monotonic() - started
        meta = {"recipe": full.to_json(), "key": key, "format": FORMAT, "seconds": seconds,
                "created": time.time()}  # fmt: skip
        for f in final.iterdir():
            f.chmod(0o644)
        (final / "meta.json").write_text(json.dumps(meta, indent=1))
        _progress(full, key, f"in {seconds:.1f}s", started, "built")
        return DebianImage.at(final, key)
