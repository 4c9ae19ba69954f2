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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_vmenv.images import BuildEvent, ImageCache, Recipe, publish
from pytest_vmenv.ledger import flocked

from .debs import run
from .forwards import GUEST_ADDRESS, MAC
from .tree import SafeTree

__all__ = [
    "CMDLINE",
    "GUEST_FILES",
    "GUEST_PACKAGES",
    "DebianImage",
    "ensure_debian",
    "boot_files",
    "built_once",
    "copy_tree",
    "guest_recipe",
    "progress",
    "used_mib",
    "write_guest_files",
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
FORMAT = "2"
"""The layout of the qcow2 made from a tree: bumped when :data:`GUEST_FILES` or the disk
changes (it is part of the image dir's name)."""

_NETWORK = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
"""
_FORWARD = f"""[Match]
MACAddress={MAC}

[Link]
RequiredForOnline=no

[Network]
Address={GUEST_ADDRESS}/24
DHCP=no
LinkLocalAddressing=no
IPv6AcceptRA=no
"""
GUEST_FILES: dict[str, str] = {
    # the port-forward NIC (see forwards.py): a fixed address, no DHCP, no route; it sorts
    # before 50-vmenv-dhcp, and networkd applies the first file that matches
    "etc/systemd/network/40-vmenv-forward.network": _FORWARD,
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


def guest_recipe(recipe: Recipe, packages: tuple[str, ...] = GUEST_PACKAGES) -> Recipe:
    """``recipe`` with ``packages`` (:data:`GUEST_PACKAGES`: the tree a libvirt machine boots)."""
    return Recipe(recipe.base, recipe.packages + packages, recipe.init)


def progress(recipe: Recipe, key: str, what: str, step: str, started: float,
             state: str = "building") -> None:  # fmt: skip
    """A build event of ``recipe`` made into ``what`` (``qcow2``, ``bootable disk``)."""
    publish(
        BuildEvent(f"{recipe.describe()} as {what}", key, state, step, time.monotonic() - started)
    )


def boot_files(tree: Path, out: Path) -> None:
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


def write_guest_files(root: Path, files: dict[str, str], links: dict[str, str]) -> None:
    """``files`` (path: text) and ``links`` (path: target) into the copied tree ``root``,
    link-safely (:class:`.tree.SafeTree`: never written through a link)."""
    tree = SafeTree.existing(root)
    try:
        for rel, text in files.items():
            tree.replace(rel, text.encode())
        for rel, target in links.items():
            tree.replace_link(target, rel)
    finally:
        tree.close()


def used_mib(root: Path) -> int:
    """The MiB the tree ``root`` takes (``du -sxm``), to size a file system that holds it."""
    out = subprocess.run(["du", "-sxm", str(root)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _disk(root: Path, raw: Path, qcow2: Path) -> None:
    """The ext4 file system of ``root`` (sized to hold it, with room to spare) as ``qcow2``."""
    size = max(2048, used_mib(root) * 2 + 512)
    run(["mkfs.ext4", "-q", "-F", "-L", "vmenv-debian", "-d", str(root),
         "-E", "lazy_itable_init=1,lazy_journal_init=1", str(raw), f"{size}M"])  # fmt: skip
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])


def copy_tree(cache: ImageCache, recipe: Recipe, work: Path, say: Callable[[str], None]) -> Path:
    """The core's tree of ``recipe`` (built if needed, held while it is read) copied to
    ``work/root`` (``cp -a``: links stay links); the copy's path."""
    with cache.using(recipe) as tree:
        say("copying the tree")
        run(["cp", "-a", "--reflink=auto", "--", str(tree), str(work / "root")])
    return work / "root"


def _build(cache: ImageCache, recipe: Recipe, key: str, work: Path, out: Path) -> None:
    started = time.monotonic()

    def say(step: str) -> None:
        progress(recipe, key, "qcow2", step, started)

    root = copy_tree(cache, recipe, work, say)
    say("writing the guest's files")
    write_guest_files(root, GUEST_FILES, GUEST_LINKS)
    boot_files(root, out)
    say("making the ext4 file system and the qcow2")
    _disk(root, work / "rootfs.raw", out / "rootfs.qcow2")


def built_once(images_dir: Path, name: str, full: Recipe, key: str, what: str,
               build: Callable[[Path, Path], None]) -> Path:  # fmt: skip
    """``images_dir/name``, made by ``build(work, out)`` unless it is there (finished: it
    has ``meta.json``). Builds of one name are serialized by a lock beside it; ``out`` is
    renamed into place when ``build`` returns, so a failed build leaves nothing."""
    final = images_dir / name
    if (final / "meta.json").exists():
        return final
    images_dir.mkdir(parents=True, exist_ok=True)
    with flocked(images_dir / f"{name}.lock"):
        if (final / "meta.json").exists():
            return final
        started = time.monotonic()
        work = images_dir / f"{name}.build"
        for stale in (work, final):
            run(["rm", "-rf", "--one-file-system", "--", str(stale)])
        (work / "out").mkdir(parents=True)
        try:
            build(work, work / "out")
            os.rename(work / "out", final)
        except BaseException:
            progress(full, key, what, "failed", started, "failed")
            raise
        finally:
            run(["rm", "-rf", "--one-file-system", "--", str(work)])
        seconds = time.monotonic() - started
        meta = {"recipe": full.to_json(), "key": key, "image": name, "seconds": seconds,
                "created": time.time()}  # fmt: skip
        for f in final.iterdir():
            f.chmod(0o644)
        (final / "meta.json").write_text(json.dumps(meta, indent=1))
        progress(full, key, what, f"in {seconds:.1f}s", started, "built")
        return final


def ensure_debian(state_dir: Path, images_dir: Path, recipe: Recipe) -> DebianImage:
    """The qcow2 image of ``recipe`` (plus :data:`GUEST_PACKAGES`), built if this host has
    none: see the module docstring. ``state_dir`` holds the core's trees."""
    cache = ImageCache(state_dir)
    full = guest_recipe(recipe)
    key = cache.key(full)
    final = built_once(images_dir, f"debian-{FORMAT}-{key}", full, key, "qcow2",
                       lambda work, out: _build(cache, full, key, work, out))  # fmt: skip
    return DebianImage.at(final, key)
