"""`vmenv images`: every cache in the state dir with its size; `rm` removes what nothing uses.

Each test has a state dir of its own (VMENV_STATE_DIR for the inner pytest runs and the
`vmenv` calls), so what it lists is exactly what it made.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator needs root here")

INNER = """
import os, pathlib, time, pytest

@pytest.mark.vm(image="mini.tar.gz", provision=["echo provisioned > /provisioned"])
def test_uses_the_image(vm):
    assert vm.succeed("cat /provisioned") == "provisioned\\n"
    gate = os.environ.get("GATE")
    if gate:  # hold the session open until the outer test has looked
        pathlib.Path(gate, "running").touch()
        deadline = time.monotonic() + 60
        while not pathlib.Path(gate, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    monkeypatch.setenv("VMENV_STATE_DIR", str(path))
    return path


def vmenv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", *args], capture_output=True, text=True, timeout=60
    )


def mini_image(path: Path) -> Path:
    """A tarball rootfs of a few host binaries and their libraries (a few MiB)."""
    wanted = {"/bin/sh", "/bin/cat", "/bin/echo"}
    libs: set[str] = set()
    for binary in wanted:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        libs.update(p for p in out.split() if p.startswith("/"))
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(wanted | libs):
            tar.add(os.path.realpath(name), arcname=name.lstrip("/"))
    return path


def rows(listing: str, kind: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in listing.splitlines() if line.startswith(kind)]


def test_images_lists_an_unpacked_tarball_with_its_size_and_rm_removes_it(
    pytester: pytest.Pytester, state: Path
) -> None:
    empty = vmenv("images")
    assert empty.returncode == 0 and empty.stdout == f"no cached images in {state}\n", empty

    image = mini_image(pytester.path / "mini.tar.gz")
    pytester.makepyfile(INNER)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    # libvirt's tiny image cache, as a libvirt run leaves it (this listing only counts it)
    tiny = state / "libvirt" / "images" / "tiny-test"
    tiny.mkdir(parents=True)
    (tiny / "rootfs.qcow2").write_bytes(os.urandom(1 << 20))

    listing = vmenv("images")
    assert listing.returncode == 0, listing
    (unpacked,) = rows(listing.stdout, "tarball image")
    _kind, backend, size, _age, cache_id, detail = unpacked
    assert backend == "emulator" and detail == f"unpacked from {image}", listing.stdout
    unpacked_dir = state / "emulator" / "images" / cache_id
    du = int(subprocess.run(["du", "-sk", str(unpacked_dir)], capture_output=True, text=True)
             .stdout.split()[0])  # fmt: skip
    assert size == f"{du / 1024:.1f} MiB", (size, du)
    (other,) = rows(listing.stdout, "other files")
    assert other[1] == "libvirt" and other[2] == "1.0 MiB", listing.stdout
    assert re.search(rf"^total \d+\.\d MiB in {re.escape(str(state))}", listing.stdout, re.M)

    removed = vmenv("images", "rm")
    assert removed.returncode == 0, removed
    assert f"removed emulator tarball image {cache_id} ({size})" in removed.stdout
    assert f"left {state / 'libvirt'} (1.0 MiB): " in removed.stdout  # never ours to remove
    assert not unpacked_dir.exists() and tiny.exists()
    assert "tarball image" not in vmenv("images").stdout


def test_images_rm_leaves_what_a_running_session_or_a_kept_machine_uses(
    pytester: pytest.Pytester, state: Path
) -> None:
    mini_image(pytester.path / "mini.tar.gz")
    pytester.makepyfile(INNER)
    gate = pytester.path / "gate"
    gate.mkdir()
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--vm-keep=always"],
        cwd=pytester.path,
        env={**os.environ, "GATE": str(gate)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (gate / "running").exists():
            assert inner.poll() is None and time.monotonic() < deadline, inner.communicate()[0]
            time.sleep(0.05)
        listing = vmenv("images").stdout
        (template,) = rows(listing, "template")
        assert re.search(r"in use: (machine vm \(\w+\) stacks on it|session \S+ is running)",
                         template[5]), listing  # fmt: skip
        (unpacked,) = rows(listing, "tarball image")
        assert "in use: " in unpacked[5], listing
        (scratch,) = rows(listing, "scratch")
        assert "in use: session " in scratch[5], listing

        named = vmenv("images", "rm", template[4])
        assert named.returncode == 1, named
        assert f"left template {template[4]}: in use: " in named.stdout
        everything = vmenv("images", "rm")
        assert everything.returncode == 0, everything
        assert "removed" not in everything.stdout, everything.stdout
        assert (state / "emulator" / "layers" / template[4]).exists()
    finally:
        (gate / "go").touch()
        out = inner.communicate(timeout=60)[0]
    assert inner.returncode == 0, out

    # the session is over; its kept machine still runs on the unpacked image
    after = vmenv("images", "rm")
    assert after.returncode == 0, after
    assert f"left tarball image {unpacked[4]}: in use: machine vm (" in after.stdout, after.stdout
    assert (state / "emulator" / "images" / unpacked[4]).exists()
    vmenv("gc", "--all")
    final = vmenv("images", "rm")
    assert f"removed emulator tarball image {unpacked[4]}" in final.stdout, final.stdout
    assert vmenv("images").stdout == f"no cached images in {state}\n"
