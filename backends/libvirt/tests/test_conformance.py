"""The shared backend conformance suite against a real libvirtd and QEMU, on the tiny image."""

from __future__ import annotations

import pytest
from vmenv_libvirt import LibvirtBackend

from pytest_vmenv.spec import MachineSpec
from pytest_vmenv.testing import BackendConformance


class TestLibvirt(BackendConformance):
    @pytest.fixture(scope="class")
    def backend(self, libvirt_backend: LibvirtBackend) -> LibvirtBackend:
        return libvirt_backend

    @pytest.fixture(scope="class")
    def base_spec(self) -> MachineSpec:
        return MachineSpec(image="tiny", backend="libvirt", memory=256 * 1024**2, timeout=120)
