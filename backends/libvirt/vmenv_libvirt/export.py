"""Export a recipe's qcow2 for another hypervisor: a VMDK for a vSphere template.

Contract: :func:`export_disk` converts a disk with ``qemu-img convert``; for ``vmdk`` as a
``streamOptimized`` VMDK (the compressed, sequential subformat vSphere imports from an OVF
or through ``vmkfstools -i``), SCSI adapter ``lsilogic``. The file is written beside its
destination and renamed into place, so a half-written export never has the final name.

``python -m vmenv_libvirt.export NAME DEST [--packages a,b] [--format vmdk|qcow2|raw]``
builds the image of recipe ``NAME`` (``debian-12`` or an ``[images.NAME]`` recipe of
``vmenv.toml`` here) as the libvirt backend boots it (:mod:`.debian`), then exports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .debs import TinyBuildError, run

__all__ = ["FORMATS", "export_disk", "main"]

FORMATS: dict[str, list[str]] = {
    "vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized,adapter_type=lsilogic"],
    "qcow2": ["-O", "qcow2"],
    "raw": ["-O", "raw"],
}


def export_disk(src: Path, dest: Path, fmt: str = "vmdk") -> Path:
    """``src`` (qcow2 or raw) converted to ``fmt`` at ``dest``; returns ``dest``."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        run(["qemu-img", "convert", "-q", *FORMATS[fmt], str(src), str(part)])
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    from pytest_vmenv.cli.building import named_recipe
    from pytest_vmenv.errors import VmenvError
    from pytest_vmenv.images import LinePrinter, subscribe
    from pytest_vmenv.paths import state_dir

    from .debian import ensure_debian

    parser = argparse.ArgumentParser(prog="python -m vmenv_libvirt.export")
    parser.add_argument("name", help="debian-12, or an [images.NAME] recipe of vmenv.toml")
    parser.add_argument("dest", type=Path, help="the file to write (e.g. web.vmdk)")
    parser.add_argument("--packages", default="", help="extra packages, comma-separated")
    parser.add_argument("--format", choices=sorted(FORMATS), default="vmdk")
    args = parser.parse_args(argv)
    unsubscribe = subscribe(LinePrinter(lambda text: print(text, file=sys.stderr, flush=True)))
    try:
        recipe = named_recipe(args.name, args.packages, "systemd")
        state = state_dir()
        image = ensure_debian(state, state / "libvirt" / "images", recipe)
        export_disk(image.disk, args.dest, args.format)
    except (VmenvError, TinyBuildError, ValueError) as exc:
        print(f"vmenv_libvirt.export: {exc}", file=sys.stderr)
        return 1
    finally:
        unsubscribe()
    print(f"{args.dest}  ({args.format}, from {image.disk}; kernel {image.kernel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
