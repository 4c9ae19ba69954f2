"""Fixtures for the libvirt backend's tests: a real libvirtd, real QEMU guests (TCG here).

The tests skip, with the reason, only when libvirtd does not answer (start it with
``.ci/libvirt.sh start``). The state dir is the normal one (``$VMENV_STATE_DIR``), so the tiny
image and the KVM verdict are built once and reused across runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from vmenv_libvirt import LibvirtBackend

from pytest_vmenv.backend import Session, Snapshot
from pytest_vmenv.errors import BackendUnavailable
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

_DEBIAN = MachineSpec(
    image="debian-12",
    backend="libvirt",
    memory=512 * 1024**2,
    timeout=900,
    # iproute2 (``ss``, for testinfra's sockets) and openssh-server (``vm.ssh_config``) are in
    # the libvirt image's GUEST_PACKAGES already, so its key is that of nginx alone; the
    # emulator's tree of this spec (test_debian_both.py) gets them from here.
    packages=("nginx", "iproute2", "openssh-server"),
    image_config={"base": "debian-12", "packages": []},
)


@pytest.fixture(scope="session")
def libvirt_backend() -> Iterator[LibvirtBackend]:
    backend = LibvirtBackend({})
    try:
        backend.check()
    except BackendUnavailable as exc:
        pytest.skip(f"libvirtd is not reachable: {exc.reason}")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def debian_spec() -> MachineSpec:
    """The Debian machine of the tests: one template for every module (a TCG boot is slow)."""
    return _DEBIAN


@pytest.fixture(scope="session")
def debian_session() -> Session:
    return Session(id="lvd-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="lvd")


@pytest.fixture(scope="session")
def debian_template(libvirt_backend: LibvirtBackend, debian_session: Session) -> Iterator[Snapshot]:
    """A template of ``debian_spec`` (its image built once per key, kept across runs)."""
    snap = libvirt_backend.build_template(_DEBIAN, "lvd-" + debian_session.id, debian_session)
    yield snap
    libvirt_backend.remove_template(snap)
