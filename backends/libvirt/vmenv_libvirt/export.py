"""Export a recipe as a whole bootable disk for another hypervisor: a VMDK for vSphere.

Contract: :func:`export_disk` converts a disk with ``qemu-img convert``; for ``vmdk`` as a
``streamOptimized`` VMDK (the compressed, sequential subformat vSphere imports from an OVF
or with ``govc import.vmdk``), SCSI adapter ``lsilogic``. The file is written beside its
destination and renamed into place, so a half-written export never has the final name.
A conversion is announced as a progress event before it starts and when it is done.

``python -m vmenv_libvirt.export NAME DEST [--packages a,b] [--format vmdk|qcow2|raw]``
builds recipe ``NAME`` (``debian-12`` or an ``[images.NAME] recipe of ``vmenv.toml`` here)
as the disk BIOS firmware boots by itself (:mod:`.bootdisk`: MBR, SYSLINUX, ext4 root,
Debian's generic kernel, open-vm-tools, openssh-server), then writes it: the VMDK the build
converted once is copied (:func:`copy_disk`), qcow2 and raw are converted from the qcow2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from pytest_vmenv.images import BuildEvent, publish

from .bootdisk import VMDK_OPTIONS, ensure_bootdisk
from .debs import TinyBuildError, run

__all__ = ["FORMATS", "copy_disk", "export_disk", "main", "public_keys"]

FORMATS: dict[str, list[str]] = {
    "vmdk": VMDK_OPTIONS,
    "qcow2": ["-O", "qcow2"],
    "raw": ["-O", "raw"],
}


def export_disk(src: Path, dest: Path, fmt: str = "vmdk") -> Path:
    """``src`` (qcow2 or raw) converted to ``fmt`` at ``dest``; returns ``dest``."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    started = time.monotonic()

    def say(state: str, step: str) -> None:
        publish(BuildEvent(f"{dest.name} ({fmt})", "export", state, step,
                           time.monotonic() - started))  # fmt: skip

    say("building", f"converting {src.name} with qemu-img")
    try:
        run(["qemu-img", "convert", "-q", *FORMATS[fmt], str(src), str(part)])
        os.replace(part, dest)
    except BaseException:
        say("failed", "qemu-img convert failed")
        raise
    finally:
        part.unlink(missing_ok=True)
    say("built", f"in {time.monotonic() - started:.1f}s")
    return dest


def copy_disk(src: Path, dest: Path) -> Path:
    """``src`` copied to ``dest`` as :func:`export_disk` writes (a part file renamed)."""
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(src, part)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


_KEY_TYPES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-sha2-")


def public_keys(path: Path) -> str:
    """The OpenSSH public key lines of ``path`` (blank and ``#`` lines dropped), for root's
    authorized_keys; a file that holds anything else (a private key, say) is refused."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--authorized-key {path}: cannot read it ({exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    bad = [n for n, line in enumerate(keys, 1) if not line.startswith(_KEY_TYPES)]
    if not keys or bad:
        raise ValueError(
            f"--authorized-key {path}: not an OpenSSH public key file (give the .pub file, "
            "e.g. ~/.ssh/id_ed25519.pub)"
        )
    return "".join(f"{key}\n" for key in keys)


def main(argv: list[str] | None = None) -> int:
    from pytest_vmenv.cli.building import named_recipe
    from pytest_vmenv.errors import VmenvError
    from pytest_vmenv.images import LinePrinter, subscribe
    from pytest_vmenv.paths import state_dir

    parser = argparse.ArgumentParser(prog="python -m vmenv_libvirt.export")
    parser.add_argument("name", help="debian-12, or an [images.NAME] recipe of vmenv.toml")
    parser.add_argument("dest", type=Path, help="the file to write (e.g. web.vmdk)")
    parser.add_argument("--packages", default="", help="extra packages, comma-separated")
    parser.add_argument("--format", choices=sorted(FORMATS), default="vmdk")
    parser.add_argument(
        "--authorized-key", type=Path, metavar="FILE",
        help="an OpenSSH public key file (e.g. ~/.ssh/id_ed25519.pub): root's authorized_keys "
        "in the disk, the login the vSphere backend's ssh_key uses (the disk has no other)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unsubscribe = subscribe(LinePrinter(lambda text: print(text, file=sys.stderr, flush=True)))
    try:
        recipe = named_recipe(args.name, args.packages, "systemd")
        keys = public_keys(args.authorized_key) if args.authorized_key else ""
        state = state_dir()
        image = ensure_bootdisk(state, state / "libvirt" / "images", recipe, keys)
        source = image.vmdk if args.format == "vmdk" else image.disk
        if args.format == "vmdk":
            copy_disk(source, args.dest)
        else:
            export_disk(source, args.dest, args.format)
    except (VmenvError, TinyBuildError, ValueError) as exc:
        print(f"vmenv_libvirt.export: {exc}", file=sys.stderr)
        return 1
    finally:
        unsubscribe()
    print(f"{args.dest}  ({args.format}, BIOS boot, from {source}; {image.cmdline})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
