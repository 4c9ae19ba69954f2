"""``vmenv images`` on the libvirt backend's built images, with the real CLI and real images.

The tiny image (the suite's, copied) sits in a shared images dir that two state dirs reach
through a ``<state>/libvirt/images`` symlink, as CI's checkouts do: a template built on it from
one state dir holds it against removal from the other, and removal empties the shared dir
without replacing the symlink or following a link out. The Debian image is the one the
suite's ``debian-12 + nginx`` template boots (built once, shared with test_debian.py).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.tiny import ensure_tiny

from pytest_vmenv.backend import Session, Snapshot
from pytest_vmenv.errors import BackendError
from pytest_vmenv.images import builder_problem
from pytest_vmenv.ledger import flocked
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

SPEC = MachineSpec(image="tiny", backend="libvirt", memory=256 * 1024**2, timeout=120)


def vmenv(state: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMENV_STATE_DIR": str(state)}
    return subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", *args],
        cwd=cwd or state,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def shared(libvirt_backend: LibvirtBackend) -> Iterator[tuple[Path, Path, Path]]:
    """(state dir a, state dir b, the images dir both link to), holding a copy of tiny-2."""
    tiny = ensure_tiny(libvirt_backend.parts.paths.images)
    root = state_dir() / "libvirt-test" / secrets.token_hex(4)
    images = root / "shared"
    shutil.copytree(tiny.dir, images / tiny.dir.name, ignore=shutil.ignore_patterns("users"))
    states = root / "a", root / "b"
    for state in states:
        (state / "libvirt").mkdir(parents=True)
        (state / "libvirt" / "images").symlink_to(images)
    try:
        yield states[0], states[1], images
    finally:
        conn = libvirt.open(libvirt_backend.uris[0])
        try:
            for state in states:
                pool = LibvirtBackend({}, state_dir=state).parts.pool.name
                if pool in conn.listStoragePools():
                    conn.storagePoolLookupByName(pool).destroy()  # transient: gone
        finally:
            conn.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_tiny_image_in_a_shared_dir_is_listed_held_and_removed(
    shared: tuple[Path, Path, Path],
) -> None:
    a, b, images = shared
    outside = a.parent / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the image's")
    (images / "tiny-2" / "escape").symlink_to(outside)
    torn = images / "tiny-ssh-3.build"  # a build that died half way
    (torn / "out").mkdir(parents=True)
    listing = vmenv(a, "images").stdout
    assert re.search(r"^torn image build\s+libvirt\s.*\stiny-ssh-3\.build\s", listing, re.M)
    row = re.search(r"^image\s+libvirt\s+(\S+ \S+)\s+\S+\s+tiny-2\s+(.*)$", listing, re.M)
    assert row, listing
    assert "the built-in tiny image, recipe 2 (" in row.group(2) and "qemu-guest-agent" in row[2]
    assert row.group(1).endswith("MiB") and "in use" not in row.group(2)

    with flocked(images / "tiny-2.lock"):  # as a build of it, or a template build on it
        busy = vmenv(a, "images", "rm", "tiny-2")
    assert busy.returncode == 1 and "it is being built, or a template is being built" in (
        busy.stdout
    ), busy
    swept = vmenv(a, "images", "rm", "tiny-ssh-3.build")
    assert (
        swept.returncode == 0
        and "removed libvirt torn image build tiny-ssh-3.build (" in swept.stdout
    ), swept
    assert not torn.exists()

    other = LibvirtBackend({"ram_state": False}, state_dir=b)
    session = Session(id="lvi-" + secrets.token_hex(4), state_dir=b, worker_id="lvi")
    snap = other.build_template(SPEC, "lvi-" + session.id, session)
    try:
        held = vmenv(a, "images", "rm", "tiny-2")
        assert held.returncode == 1, held
        assert f"left image tiny-2: in use: template {snap.key} of the state dir {b}" in (
            held.stdout
        ), held
        assert f"`VMENV_STATE_DIR={b} vmenv images rm {snap.key}`" in held.stdout
        mine = LibvirtBackend({}, state_dir=a)
        cache = next(c for c in mine.caches(set()) if c.id == "tiny-2")
        with pytest.raises(BackendError, match="remove the template first"):
            mine.remove_cache(cache, set())
        assert "a template was last built on it" in vmenv(a, "images").stdout
        assert (images / "tiny-2" / "rootfs.qcow2").is_file()
    finally:
        other.remove_template(snap)
        other.close()
    assert not list((images / "tiny-2" / "users").glob("*.json"))  # the note went with it
    gone = vmenv(a, "images", "rm", "tiny-2")
    assert gone.returncode == 0 and "removed libvirt image tiny-2 (" in gone.stdout, gone
    assert (a / "libvirt" / "images").is_symlink()
    assert sorted(p.name for p in images.iterdir()) == ["tiny-2.lock", "tiny-ssh-3.lock"]
    assert (outside / "keep").read_text() == "not the image's"
    assert "no cached images" in vmenv(a, "images").stdout


@pytest.mark.skipif(builder_problem() is not None, reason=str(builder_problem()))
def test_the_debian_image_of_a_template_is_listed_held_and_built_ahead(
    debian_template: Snapshot, tmp_path: Path
) -> None:
    image = Path(debian_template.data["boot"]["kernel"]).parent
    state = state_dir()
    listing = vmenv(state, "images", cwd=tmp_path).stdout
    row = re.search(rf"^image\s+libvirt\s+.*\s{image.name}\s+(.*)$", listing, re.M)
    assert row, listing
    assert row.group(1).startswith("debian-12 + nginx (systemd) plus the guest packages"), row[1]
    assert f"in use: template {debian_template.key} of the state dir {state}" in row.group(1)

    held = vmenv(state, "images", "rm", image.name, cwd=tmp_path)
    assert held.returncode == 1 and f"left image {image.name}: in use" in held.stdout, held
    assert (image / "rootfs.qcow2").is_file()

    argv = ("images", "build", "debian-12", "--packages", "nginx", "--backend", "libvirt")
    built = vmenv(state, *argv, cwd=tmp_path)
    assert built.returncode == 0, built
    assert built.stdout == f"{image.name}  {image / 'rootfs.qcow2'}\n", built
    refused = vmenv(state, *argv[:-1], "emulator", cwd=tmp_path)
    assert refused.returncode == 2 and "builds no image of its own" in refused.stderr, refused
