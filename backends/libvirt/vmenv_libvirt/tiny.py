"""The built-in ``tiny`` image, built on first use from Debian packages only.

Contract: :func:`ensure_tiny` returns a complete :class:`TinyImage` under
``<state>/libvirt/images/tiny-<recipe>/``, building it once (a file lock serialises
processes; a torn build is discarded and redone). Packages come from ``apt-get download``
(the host's configured Debian mirror), never from anywhere else:

* ``linux-image-cloud-amd64``'s kernel. Virtio is modules there, so an initramfs (a cpio
  built in memory) loads them in dependency order, mounts ``/dev/vda`` and ``switch_root``s.
  With ``vmenv.probe=1`` on the command line it only prints a marker and powers off: that is
  the KVM probe of :mod:`.accel`.
* a root filesystem of ``busybox-static`` plus ``qemu-ga`` and the libraries it links (copied
  from the host, which has them as the dependencies of qemu), written through
  :class:`.tree.SafeTree` (never through a symlink), made with ``mkfs.ext4 -d`` and
  converted to qcow2 (about 9 MiB).

``ensure_tiny(..., ssh=True)`` builds ``tiny-ssh-<recipe>`` instead: dropbear and no qemu-ga
(see :mod:`.tinyssh`), for images whose command channel is SSH.

Why not a cloud image: nothing may be fetched from the internet, and this boots in ~4 s under
TCG where a systemd image takes a minute.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .tree import SafeTree, cpio_newc

__all__ = ["CMDLINE", "MODULES", "READY_MARKER", "TinyImage", "TinyBuildError", "ensure_tiny"]

RECIPE = "1"  # the plain image; tiny-ssh-* is rebuilt when SSH_RECIPE changes
SSH_RECIPE = "2"
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
READY_MARKER = "vmenv: tiny ready"
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

_RCS = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/virtio-ports
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/qemu-ga /run/vmenv
for a in $(cat /proc/cmdline); do
  case $a in vmenv.hostname=*) hostname "${{a#*=}}";; esac
done
ip link set lo up
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "/dev/${{p##*/}}" "/dev/virtio-ports/$(cat "$p/name")"
done
for i in /sys/class/net/*; do
  n=${{i##*/}}; [ "$n" = lo ] && continue
  udhcpc -b -S -i "$n" -x "hostname:$(hostname)" -s /usr/share/udhcpc/default.script \\
    >/dev/null 2>&1
done
echo "{READY_MARKER}" >/dev/console
"""

_QGA = "/usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0"
_INITTAB = f"""::sysinit:/etc/init.d/rcS
::respawn:{_QGA} -t /run/qemu-ga
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
"""

_UDHCPC = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done;;
esac
exit 0
"""

_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/nsswitch.conf": "hosts: files dns\n",
    "etc/resolv.conf": "",
    "etc/inittab": _INITTAB,
}


class TinyBuildError(RuntimeError):
    """The tiny image could not be built here (the message says why and what to do)."""


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


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as exc:
        raise TinyBuildError(f"`{argv[0]}` is not installed ({exc})") from None
    if done.returncode != 0:
        raise TinyBuildError(
            f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def _download(packages: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` each package into ``dest``; name -> .deb path."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages], dest)
    except TinyBuildError as exc:
        raise TinyBuildError(
            f"{exc}. The tiny image is built from Debian packages: run `apt-get update` "
            "(and check the apt sources) and retry"
        ) from None
    found: dict[str, Path] = {}
    for deb in dest.glob("*.deb"):
        found[_run(["dpkg-deb", "-f", str(deb), "Package"]).strip()] = deb
    missing = [p for p in packages if p not in found]
    if missing:
        raise TinyBuildError(f"apt-get download did not fetch {missing}")
    return found


def _extract(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def _libraries(binary: Path, libdirs: tuple[Path, ...] = ()) -> list[str]:
    """The absolute paths ``ldd`` resolves ``binary``'s libraries to, loader included
    (``libdirs``: extracted packages' library directories, searched first)."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs)}
    out = _run(["ldd", str(binary)], env=env if libdirs else None)
    libs = []
    for line in out.splitlines():
        if "not found" in line:
            raise TinyBuildError(f"{binary.name} needs a library the host lacks: {line.strip()}")
        match = re.search(r"(/\S+)", line.split("=>")[-1])
        if match:
            libs.append(match.group(1))
    return libs


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
        found = [p for p in mods[0].rglob(f"{name}.ko*")]
        if not found or found[0].suffix != ".ko":
            raise TinyBuildError(f"module {name}.ko not found (or compressed) in the kernel")
        entries.append((f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, found[0].read_bytes()))
    return cpio_newc(entries)


def _rootfs(tree: SafeTree, busybox: Path, qemu_ga: Path, ssh: list[Path] | None = None) -> None:
    """The root tree; with ``ssh`` (the extracted dropbear packages), the ssh variant."""
    written: dict[str, bytes] = {}

    def put(rel: str, data: bytes, mode: int = 0o644) -> None:
        if rel not in written:
            tree.write(rel, data, mode)
            written[rel] = data

    for d in (
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "var/tmp",
        "var/lib",
        "mnt",
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/share/udhcpc",
        "etc/init.d",
    ):
        tree.mkdir(d)
    tree.mkdir("tmp", 0o1777)
    tree.mkdir("var/tmp", 0o1777)
    put("bin/busybox", busybox.read_bytes(), 0o755)
    etc, rcs = dict(_ETC), _RCS
    if ssh is not None:
        from .tinyssh import dropbear_files

        files, etc["etc/inittab"], rcs = dropbear_files(
            ssh, tree.root.parent, _RCS, _INITTAB, READY_MARKER
        )
        for rel, (data, mode) in files.items():
            put(rel, data, mode)
    for applet in _run([str(busybox), "--list-full"]).split():
        if applet.strip("/") != "bin/busybox":
            tree.symlink("/bin/busybox", applet)
    if ssh is None:
        put("usr/sbin/qemu-ga", qemu_ga.read_bytes(), 0o755)
        for lib in _libraries(qemu_ga):
            put(lib.lstrip("/"), Path(lib).resolve().read_bytes(), 0o755)
    for rel, text in etc.items():
        put(rel, text.encode())
    put("etc/init.d/rcS", rcs.encode(), 0o755)
    put("usr/share/udhcpc/default.script", _UDHCPC.encode(), 0o755)
    tree.symlink("/run", "var/run")
    tree.verify(written)


def ensure_tiny(images_dir: Path, ssh: bool = False) -> TinyImage:
    """The tiny image, built now if this state dir has none (see the module docstring).

    ``ssh``: the variant with dropbear and no guest agent (:mod:`.tinyssh`), ``tiny-ssh-*``.
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    stem = f"tiny-ssh-{SSH_RECIPE}" if ssh else f"tiny-{RECIPE}"
    final = images_dir / stem
    if (final / "meta.json").exists():
        return TinyImage.at(final)
    with _flock(images_dir / f"{stem}.lock"):
        if (final / "meta.json").exists():
            return TinyImage.at(final)
        start = time.monotonic()
        work = images_dir / f"{stem}.build"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        work.mkdir()
        try:
            debs = _download(
                ["linux-image-cloud-amd64", "busybox-static", "qemu-guest-agent"], work / "debs"
            )
            depends = _run(["dpkg-deb", "-f", str(debs["linux-image-cloud-amd64"]), "Depends"])
            match = re.search(r"linux-image-[0-9][^\s,(]*", depends)
            if match is None:
                raise TinyBuildError(f"linux-image-cloud-amd64 depends on no kernel: {depends}")
            debs.update(_download([match.group(0)], work / "kdebs"))
            kroot = _extract(debs[match.group(0)], work / "x-kernel")
            bb = _extract(debs["busybox-static"], work / "x-busybox") / "bin" / "busybox"
            ga = _extract(debs["qemu-guest-agent"], work / "x-qga") / "usr" / "sbin" / "qemu-ga"
            out = work / "out"
            out.mkdir()
            vmlinuz = next((kroot / "boot").glob("vmlinuz-*"))
            shutil.copyfile(vmlinuz, out / "vmlinuz")
            (out / "initrd.img").write_bytes(_initramfs(kroot, bb.read_bytes()))
            extra = None
            if ssh:
                from .tinyssh import PACKAGES

                debs.update(_download(list(PACKAGES), work / "sdebs"))
                extra = [_extract(debs[p], work / f"x-{p}") for p in PACKAGES]
            tree = SafeTree(work / "root")
            try:
                _rootfs(tree, bb, ga, extra)
            finally:
                tree.close()
            raw = work / "rootfs.raw"
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    "vmenv-tiny",
                    "-d",
                    str(work / "root"),
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1",
                    str(raw),
                    "256M",
                ]
            )
            _run(
                [
                    "qemu-img",
                    "convert",
                    "-q",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    str(raw),
                    str(out / "rootfs.qcow2"),
                ]
            )
            os.rename(out, final)
            versions = {p: d.name for p, d in debs.items()}
            meta = {
                "recipe": SSH_RECIPE if ssh else RECIPE,
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
