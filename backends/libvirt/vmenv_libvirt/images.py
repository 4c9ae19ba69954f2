"""What a machine boots from: the built-in ``tiny`` image, or a user's disk (+ cloud-init).

Contract: :func:`resolve` turns a spec's image into a :class:`BootImage`:

* ``image="tiny"`` (no ``disk`` in its entry): :func:`.tiny.ensure_tiny`, direct kernel
  boot; ``tiny = "ssh"`` in an entry selects the variant with dropbear and no agent.
* a recipe (``image="debian-12"``, ``[images.NAME] base = ...``, plus ``packages=``):
  :func:`.debian.ensure_debian`, Debian's kernel and initramfs booted directly, systemd as
  init (``systemd`` is set: readiness waits for ``systemctl is-system-running``).
* ``{ disk = "debian.qcow2" }``: any qcow2/raw disk, used read-only as the backing file of
  the template's overlay (a VMDK too: ``python -m vmenv_libvirt.export`` writes one).
  Optional ``kernel``/``initrd``/``cmdline`` for direct boot; without ``kernel`` the
  firmware (SeaBIOS) boots the disk. ``controller`` is the disk's bus: ``virtio`` (the
  default), or one vSphere offers too: ``pvscsi``, ``lsilogic`` (QEMU's LSI 53C895A, not
  VMware's LSI Logic), ``sata``.
  ``cloud_init`` (default true) attaches a NoCloud seed ISO (volume id ``cidata``) whose
  user-data is rendered from ``user_data`` (a Jinja2 template of the user's) or the package's
  ``user-data.j2`` (``user``, ``ssh_key``'s public half, hostname, qemu-guest-agent). The
  ISO is written by pycdlib: no genisoimage needed.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pycdlib

from pytest_vmenv import errors
from pytest_vmenv.images import Recipe

from .connection import NAME
from .debian import ensure_debian
from .domains import render
from .remote import public_key
from .tiny import ensure_tiny

__all__ = ["CONTROLLERS", "BootImage", "resolve", "seed_iso"]

CONTROLLERS = ("virtio", "pvscsi", "lsilogic", "sata")
"""The buses a user's disk can be on (``controller =``; the domain template maps them)."""


@dataclass(frozen=True)
class BootImage:
    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    seed: Path | None = None
    tiny: bool = False
    systemd: bool = False
    built: Path | None = None  # the image dir of a built image (tiny, a recipe), see .stored
    controller: str = "virtio"


def _path(cfg: Mapping[str, Any], key: str, image: str) -> Path | None:
    value = cfg.get(key)
    if value in (None, ""):
        return None
    path = Path(str(value))
    if not path.is_file():
        raise errors.ConfigError(
            f"{NAME}: images.{image}.libvirt.{key} = {str(value)!r} is not a file"
        )
    return path.absolute()


def resolve(
    image: str,
    cfg: Mapping[str, Any],
    hostname: str,
    lv_dir: Path,
    recipe: Recipe | None = None,
) -> BootImage:
    """The boot image of ``image`` (see the module docstring); ``recipe``: the one the
    core's :func:`~pytest_vmenv.images.recipe_of` found in the machine's spec."""
    if recipe is not None:
        built = ensure_debian(lv_dir.parent, lv_dir / "images", recipe)
        return BootImage(built.disk, built.kernel, built.initrd, built.cmdline,
                         systemd=recipe.init == "systemd", built=built.dir)  # fmt: skip
    if cfg.get("tiny") or (image == "tiny" and not cfg.get("disk")):
        variant = cfg.get("tiny", True)
        if variant not in (True, "ssh"):
            raise errors.ConfigError(
                f'{NAME}: images.{image}.libvirt.tiny = {variant!r}: use true or "ssh"'
            )
        tiny = ensure_tiny(lv_dir / "images", ssh=variant == "ssh")
        return BootImage(tiny.disk, tiny.kernel, tiny.initrd, tiny.cmdline, None, True,
                         built=tiny.dir)  # fmt: skip
    if not cfg:
        raise errors.ConfigError(
            f'{NAME}: image {image!r} has no libvirt entry; use image="tiny" or add '
            f'[images.{image}] libvirt = {{ disk = "path/to/disk.qcow2" }} to vmenv.toml'
        )
    disk = _path(cfg, "disk", image)
    if disk is None:
        raise errors.ConfigError(
            f'{NAME}: images.{image}.libvirt needs disk = "path/to/disk.qcow2"'
        )
    kernel, initrd = _path(cfg, "kernel", image), _path(cfg, "initrd", image)
    controller = str(cfg.get("controller", "virtio"))
    if controller not in CONTROLLERS:
        raise errors.ConfigError(
            f"{NAME}: images.{image}.libvirt.controller = {controller!r}: use one of "
            f"{', '.join(CONTROLLERS)}"
        )
    seed = None
    if cfg.get("cloud_init", True):
        seed = seed_iso(cfg, hostname, lv_dir / "seeds", image)
    return BootImage(disk, kernel, initrd, str(cfg.get("cmdline", "")), seed, False,
                     controller=controller)  # fmt: skip


def seed_iso(cfg: Mapping[str, Any], hostname: str, seeds: Path, image: str) -> Path:
    """A NoCloud seed ISO for ``cfg`` (cached by content under ``seeds``)."""
    key = cfg.get("ssh_key", "")
    if key and Path(str(key)).expanduser().is_file():
        path = Path(str(key)).expanduser()
        key = path.read_text().strip()
        if "PRIVATE KEY" in key:  # the SSH channel's key: only its public half goes in
            key = public_key(path)
    variables = {
        "hostname": hostname,
        "user": cfg.get("user", "vmenv"),
        "ssh_key": key,
        "packages": list(cfg.get("packages", ["qemu-guest-agent"])),
    }
    if cfg.get("user_data"):
        template = _path(cfg, "user_data", image)
        assert template is not None
        user_data = jinja2.Template(template.read_text()).render(**variables)
    else:
        user_data = render("user-data.j2", **variables)
    meta = f"instance-id: vmenv-{hostname}\nlocal-hostname: {hostname}\n"
    digest = hashlib.sha256((user_data + meta).encode()).hexdigest()[:16]
    seeds.mkdir(parents=True, exist_ok=True)
    path = seeds / f"seed-{digest}.iso"
    if path.exists():
        return path
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in (("user-data", user_data), ("meta-data", meta)):
        data = text.encode()
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"/{name.upper().replace('-', '')}.;1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    iso.write(str(tmp))
    iso.close()
    os.replace(tmp, path)
    return path
