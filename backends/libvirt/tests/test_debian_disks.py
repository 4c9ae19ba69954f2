"""A recipe's qcow2 as a user's disk: booted with the plugin's cloud-init NoCloud seed (the
VMDK export a vSphere template is made from is booted in ``test_vmdk_boot.py``).

The image is ``debian-12 + cloud-init``, built by the same recipe code as ``debian-12``
(:mod:`vmenv_libvirt.debian`), then declared the way a user declares their own disk:
``{ disk = ..., kernel = ..., initrd = ..., cmdline = ..., ssh_key = ..., user = ... }``.
The seed (:func:`vmenv_libvirt.images.seed_iso`) is what sets the hostname, makes the user
and installs the SSH key: the test reads cloud-init's own results in the guest.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.debian import CMDLINE, DebianImage, ensure_debian

from pytest_vmenv.backend import Session
from pytest_vmenv.images import Recipe, builder_problem
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

pytestmark = pytest.mark.skipif(builder_problem() is not None, reason=str(builder_problem()))


@pytest.fixture(scope="module")
def cloud_image() -> DebianImage:
    root = state_dir()
    return ensure_debian(root, root / "libvirt" / "images", Recipe("debian-12", ("cloud-init",)))


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "seeded", "-f",
                    str(key)], check=True)  # fmt: skip
    return key


@pytest.fixture(scope="module")
def seeded(
    libvirt_backend: LibvirtBackend, cloud_image: DebianImage, ssh_key: Path
) -> Iterator[Machine]:
    session = Session(id="lvc-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="lvc")
    entry = {
        "disk": str(cloud_image.disk),
        "kernel": str(cloud_image.kernel),
        "initrd": str(cloud_image.initrd),
        "cmdline": CMDLINE,
        "ssh_key": str(ssh_key.with_suffix(".pub")),
        "user": "seeded",
        "packages": [],  # the guest has no network to install from; the agent is in the image
    }
    spec = MachineSpec(name="ci-seeded", image="cloudy", backend="libvirt",
                       memory=512 * 1024**2, timeout=900, image_config=entry)  # fmt: skip
    snap = libvirt_backend.build_template(spec, "lvc-" + session.id, session)
    ref = libvirt_backend.clone(snap, replace(spec, name="ci-seeded"), session)
    try:
        yield Machine(libvirt_backend, ref, spec)
    finally:
        libvirt_backend.destroy(ref)
        libvirt_backend.remove_template(snap)


def test_cloud_init_ran_from_the_seed(seeded: Machine, ssh_key: Path) -> None:
    # cloud-init ran at the template's first boot (the seed attached, waited for); later boots
    # have no seed, so its generator leaves it off: the results are on the disk
    listing = seeded.run("find /var/lib/cloud -maxdepth 3 | head -50").stdout
    datasource = seeded.run("cat /var/lib/cloud/instance/datasource").stdout
    assert "DataSourceNoCloud" in datasource, listing
    assert "vmenv-ci-seeded" in seeded.succeed("readlink /var/lib/cloud/instance")  # meta-data
    assert seeded.succeed("cat /etc/hostname").strip() == "ci-seeded"  # cloud-init wrote it
    assert seeded.succeed("id -un seeded").strip() == "seeded"
    keys = seeded.succeed("cat /home/seeded/.ssh/authorized_keys")
    assert ssh_key.with_suffix(".pub").read_text().split()[1] in keys
