"""Fixtures for the libvirt backend's tests: a real libvirtd, real QEMU guests (TCG here).

The tests skip, with the reason, only when libvirtd does not answer (start it with
``.ci/libvirt.sh start``). The state dir is the normal one (``$VMENV_STATE_DIR``), so the tiny
image and the KVM verdict are built once and reused across runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vmenv_libvirt import LibvirtBackend

from pytest_vmenv.errors import BackendUnavailable


@pytest.fixture(scope="session")
def libvirt_backend() -> Iterator[LibvirtBackend]:
    backend = LibvirtBackend({})
    try:
        backend.check()
    except BackendUnavailable as exc:
        pytest.skip(f"libvirtd is not reachable: {exc.reason}")
    yield backend
    backend.close()
