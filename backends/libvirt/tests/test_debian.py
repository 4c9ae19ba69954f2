"""Built Debian images on the libvirt backend, against the real libvirtd and QEMU (TCG here).

One template of ``debian-12 + nginx`` (Debian's cloud kernel, systemd, qemu-guest-agent) is
built once per state dir and key; its clones prove the image: bookworm, systemd running,
the package's service active after boot, ``user=``, RAM-state clones, hostnames, and that
another package list is another image key. Cold boots of the image (networked clones) are
proven by ``examples/libvirt`` and ``bench/bench_libvirt.py --only-debian``.
"""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.debian import GUEST_PACKAGES, ensure_debian, guest_recipe

from pytest_vmenv.backend import Session, Snapshot
from pytest_vmenv.images import ImageCache, Recipe, builder_problem
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

pytestmark = pytest.mark.skipif(builder_problem() is not None, reason=str(builder_problem()))


@pytest.fixture(scope="module")
def session(debian_session: Session) -> Session:
    return debian_session


@pytest.fixture(scope="module")
def template(debian_template: Snapshot) -> Snapshot:
    return debian_template


@pytest.fixture(scope="module")
def web(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session, debian_spec: MachineSpec
) -> Iterator[Machine]:
    spec = replace(debian_spec, name="web")
    ref = libvirt_backend.clone(template, spec, session)
    try:
        yield Machine(libvirt_backend, ref, spec)
    finally:
        libvirt_backend.destroy(ref)


def test_the_template_has_a_ram_state_and_the_clone_starts_from_it(
    template: Snapshot, web: Machine, libvirt_backend: LibvirtBackend
) -> None:
    record = libvirt_backend.parts.records.require(template)
    assert record["ram"] and record["boot"]["systemd"]
    assert web.ref.data["fast"] is True


def test_os_release_says_bookworm(web: Machine) -> None:
    assert "VERSION_CODENAME=bookworm" in web.succeed("cat /etc/os-release")


def test_systemd_is_running(web: Machine) -> None:
    state = web.run("systemctl is-system-running --wait").stdout.strip()
    assert state in ("running", "degraded"), web.run("systemctl --failed").stdout
    assert web.succeed("readlink /proc/1/exe").strip().endswith("systemd")


def test_the_packages_service_is_active(web: Machine) -> None:
    assert web.succeed("systemctl is-active nginx").strip() == "active"
    get = "exec 3<>/dev/tcp/127.0.0.1/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    page = web.succeed(["bash", "-c", get], timeout=60)
    assert "200 OK" in page and "Welcome to nginx" in page


def test_nginx_through_forward_and_openssh_through_ssh_config(web: Machine) -> None:
    """The port-forward NIC of the Debian image (its ``40-vmenv-forward.network``): urllib from
    the test to nginx through ``vm.url``, and the real OpenSSH client with ``vm.ssh_config()``
    (its pinned host keys, the session's key) through ``vm.forward(22)``."""
    with urllib.request.urlopen(web.url(80), timeout=60) as response:
        assert b"Welcome to nginx" in response.read()
    ssh = web.ssh_config()
    login = subprocess.run(
        ssh.ssh_argv("systemctl is-active ssh; hostname"), capture_output=True, timeout=120
    )
    assert login.stdout == b"active\nweb\n", login.stderr


def test_the_hostname_is_the_machines_name(web: Machine) -> None:
    assert web.succeed("hostname").strip() == "web"


def test_a_useradd_user_runs_a_command(web: Machine) -> None:
    web.succeed("useradd --create-home alice")
    assert web.succeed("id -un", user="alice").strip() == "alice"
    assert web.succeed("echo $HOME", user="alice").strip() == "/home/alice"


def test_another_package_list_is_another_key() -> None:
    cache = ImageCache(state_dir())
    base = Recipe("debian-12", ("nginx",))
    keys = {
        cache.key(guest_recipe(base)),
        cache.key(guest_recipe(Recipe("debian-12", ("nginx", "curl")))),
        cache.key(base),  # the emulator's tree of the same declaration
    }
    assert len(keys) == 3
    assert set(GUEST_PACKAGES) <= set(guest_recipe(base).packages)


def test_an_unchanged_recipe_reuses_the_built_image(template: Snapshot) -> None:
    root = state_dir()
    image = ensure_debian(root, root / "libvirt" / "images", Recipe("debian-12", ("nginx",)))
    assert image.disk.is_file() and image.kernel.is_file() and image.initrd.is_file()
    again = ensure_debian(root, root / "libvirt" / "images", Recipe("debian-12", ("nginx",)))
    assert again == image and (image.dir / "meta.json").stat().st_mtime > 0
