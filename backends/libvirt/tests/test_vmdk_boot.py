"""The disk a vSphere template is made from: ``debian-12`` exported as a streamOptimized VMDK
(:mod:`vmenv_libvirt.bootdisk`, ``python -m vmenv_libvirt.export``), booted by the firmware
under QEMU on VMware's paravirtual SCSI controller.

That VMDK is booted as a user's disk, ``{ disk = "debian-12.vmdk", controller = "pvscsi",
cloud_init = false }``: no kernel is given, so SeaBIOS runs the disk's MBR, which runs
SYSLINUX from the boot partition, which boots the kernel. The plugin's agent channel then
runs the checks in the guest. The disk and its VMDK are built once per key (CI shares them
across checkouts); the boots are this module's cost.
"""

from __future__ import annotations

import json
import secrets
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.bootdisk import BOOT_MIB, BootDisk, ensure_bootdisk
from vmenv_libvirt.domains import image_format
from vmenv_libvirt.export import main, public_keys
from vmenv_libvirt.images import resolve

from pytest_vmenv.backend import Session
from pytest_vmenv.errors import ConfigError
from pytest_vmenv.images import Recipe, builder_problem
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

pytestmark = pytest.mark.skipif(builder_problem() is not None, reason=str(builder_problem()))


PUBLIC_KEY = (  # a key of this test only (its private half was never kept)
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJERhyAz/7rz3h7KrKckImbL2kAvrivuHKLuq6Mz56le"
    " vmenv-test-export"
)


@pytest.fixture(scope="module")
def bootdisk() -> BootDisk:
    root = state_dir()
    keys = f"{PUBLIC_KEY}\n"  # as the export passes them: one line each
    return ensure_bootdisk(root, root / "libvirt" / "images", Recipe("debian-12"), keys)


@pytest.fixture(scope="module")
def vmdk(bootdisk: BootDisk, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``python -m vmenv_libvirt.export debian-12 DEST --authorized-key K.pub`` writes
    (a copy of the build's)."""
    out = tmp_path_factory.mktemp("export")
    (out / "k.pub").write_text(f"# the login of the template\n{PUBLIC_KEY}")
    dest = out / "debian-12.vmdk"
    assert main(["debian-12", str(dest), "--authorized-key", str(out / "k.pub")]) == 0
    return dest


def test_only_a_public_key_file_is_taken(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n")
    with pytest.raises(ValueError, match="not an OpenSSH public key file"):
        public_keys(tmp_path / "id")
    with pytest.raises(ValueError, match="cannot read it"):
        public_keys(tmp_path / "missing.pub")
    (tmp_path / "two.pub").write_text(f"{PUBLIC_KEY}\n\n{PUBLIC_KEY}")
    assert public_keys(tmp_path / "two.pub") == f"{PUBLIC_KEY}\n{PUBLIC_KEY}\n"


@pytest.fixture(scope="module")
def booted(libvirt_backend: LibvirtBackend, vmdk: Path) -> Iterator[Machine]:
    session = Session(id="lvk-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="lvk")
    entry = {"disk": str(vmdk), "controller": "pvscsi", "cloud_init": False}
    spec = MachineSpec(name="ci-vmdk", image="vmdk", backend="libvirt",
                       memory=768 * 1024**2, cpus=2, timeout=900, image_config=entry)  # fmt: skip
    snap = libvirt_backend.build_template(spec, "lvk-" + session.id, session)
    try:
        ref = libvirt_backend.clone(snap, spec, session)
        try:
            yield Machine(libvirt_backend, ref, spec)
        finally:
            libvirt_backend.destroy(ref)
    finally:
        libvirt_backend.remove_template(snap)


def _info(path: Path) -> Any:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out)


def test_the_vmdk_is_a_stream_optimized_copy_of_the_disk(bootdisk: BootDisk, vmdk: Path) -> None:
    assert vmdk.read_bytes() == bootdisk.vmdk.read_bytes()
    info, source = _info(vmdk), _info(bootdisk.disk)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["virtual-size"] == source["virtual-size"]
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "vmdk", str(bootdisk.disk), str(vmdk)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "Images are identical" in compare.stdout


def test_the_backend_reads_a_vmdk_as_vmdk_and_refuses_an_unknown_controller(
    vmdk: Path, tmp_path: Path
) -> None:
    assert image_format(vmdk) == ("vmdk", _info(vmdk)["virtual-size"])  # the overlay's backing
    entry = {"disk": str(vmdk), "controller": "nvme", "cloud_init": False}
    with pytest.raises(ConfigError, match="controller = 'nvme': use one of virtio, pvscsi"):
        resolve("vmdk", entry, "ci-vmdk", tmp_path)


def test_the_disk_starts_with_boot_code_and_two_partitions(vmdk: Path, tmp_path: Path) -> None:
    sector = tmp_path / "mbr"
    subprocess.run(["qemu-img", "dd", "-f", "vmdk", "-O", "raw", "bs=512", "count=1",
                    f"if={vmdk}", f"of={sector}"], check=True)  # fmt: skip
    mbr = sector.read_bytes()[:512]
    assert mbr[510:] == b"\x55\xaa"
    assert mbr[:440] == Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes().ljust(440, b"\0")
    parts = [struct.unpack("<B3sB3sII", mbr[446 + 16 * i : 462 + 16 * i]) for i in range(4)]
    assert [(p[0], p[2], p[4]) for p in parts[:2]] == [
        (0x80, 0x0E, 2048),  # active FAT16 boot partition at 1 MiB
        (0x00, 0x83, 2048 + BOOT_MIB * 2048),  # the Linux root right after it
    ]
    assert parts[2][2] == parts[3][2] == 0


def test_the_firmware_booted_it_through_syslinux_on_pvscsi(
    booted: Machine, bootdisk: BootDisk
) -> None:
    state = booted.run("systemctl is-system-running --wait").stdout.strip()
    assert state in ("running", "degraded"), booted.run("systemctl --failed").stdout
    cmdline = booted.succeed("cat /proc/cmdline").split()
    assert cmdline[0] == "BOOT_IMAGE=/vmlinuz"  # SYSLINUX put it there: no direct kernel boot
    assert f"root=UUID={bootdisk.root_uuid}" in cmdline
    assert {"console=ttyS0,115200n8", "console=tty0"} <= set(cmdline)
    assert booted.succeed("findmnt -no SOURCE /").strip() == "/dev/sda2"
    hba = "$(readlink -f /sys/block/sda/device)/../../.."  # disk, target, host, PCI device
    driver = booted.succeed(f"basename $(readlink -f {hba}/driver)")
    assert driver.strip() == "vmw_pvscsi"
    assert booted.succeed("echo $((6 * 7))").strip() == "42"


def _cpio_names(archive: bytes) -> list[str]:
    """The member names of a ``newc`` cpio archive."""
    names, at = [], 0
    while archive[at : at + 6] in (b"070701", b"070702"):
        size, name_size = int(archive[at + 54 : at + 62], 16), int(archive[at + 94 : at + 102], 16)
        name = archive[at + 110 : at + 109 + name_size].decode()
        if name == "TRAILER!!!":
            break
        names.append(name)
        at = (at + 110 + name_size + 3) & ~3
        at = (at + size + 3) & ~3
    return names


def test_the_booted_initramfs_drives_every_vsphere_controller(
    vmdk: Path, bootdisk: BootDisk, tmp_path: Path
) -> None:
    boot = tmp_path / "boot.fat"  # partition 1, out of the VMDK: what SYSLINUX loads
    subprocess.run(["qemu-img", "dd", "-f", "vmdk", "-O", "raw", "bs=1048576", "skip=1",
                    f"count={BOOT_MIB}", f"if={vmdk}", f"of={boot}"], check=True)  # fmt: skip
    for name in ("initrd.img", "syslinux.cfg"):
        subprocess.run(["mcopy", "-i", str(boot), f"::/{name}", str(tmp_path / name)], check=True)
    assert f"APPEND {bootdisk.cmdline}" in (tmp_path / "syslinux.cfg").read_text()
    archive = subprocess.run(["zstd", "-dc", str(tmp_path / "initrd.img")],
                             capture_output=True, check=True).stdout  # fmt: skip
    modules = {Path(name).name for name in _cpio_names(archive) if name.endswith(".ko")}
    # LSI Logic (vSphere's default), PVSCSI, SATA (AHCI), IDE: the root disk on any of them
    assert {"mptspi.ko", "vmw_pvscsi.ko", "ahci.ko", "ata_piix.ko"} <= modules, sorted(modules)


def test_the_guest_has_what_vsphere_needs(booted: Machine) -> None:
    enabled = booted.succeed("systemctl is-enabled open-vm-tools ssh").split()
    assert enabled == ["enabled", "enabled"]
    assert booted.succeed("modinfo -n vmxnet3").strip().endswith("vmxnet3.ko")
    # the one login of the disk: root by the key given to the export, as sshd reads it
    assert booted.succeed("stat -c '%a %U' /root/.ssh /root/.ssh/authorized_keys").split() == [
        "700",
        "root",
        "600",
        "root",
    ]
    assert booted.read_text("/root/.ssh/authorized_keys") == f"{PUBLIC_KEY}\n"
    assert "permitrootlogin without-password" in booted.succeed("sshd -T").lower()
