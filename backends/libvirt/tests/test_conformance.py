"""The shared backend conformance suite against a real libvirtd and QEMU, on the tiny image."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from vmenv_libvirt import LibvirtBackend

from pytest_vmenv.spec import MachineSpec
from pytest_vmenv.testing import BackendConformance

NOBODY = "nobody:x:65534:65534:nobody:/:/bin/sh"


class TestLibvirt(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, libvirt_backend: LibvirtBackend) -> LibvirtBackend:
        return libvirt_backend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_factory(cls) -> Callable[[], LibvirtBackend]:
        """Options as ``libvirt_backend``'s; the state dir is ``$VMENV_STATE_DIR``, inherited."""
        return functools.partial(LibvirtBackend, {})

    @pytest.fixture(scope="class")
    @classmethod
    def base_spec(cls) -> MachineSpec:
        """The tiny image knows only root: its template gets a ``nobody`` for ``user=``."""
        return MachineSpec(
            image="tiny",
            backend="libvirt",
            memory=256 * 1024**2,
            timeout=120,
            provision=(f"echo '{NOBODY}' >> /etc/passwd",),
        )
