"""The core's BackendConformance suite against vcsim, with guests from the SSH lab.

Two fixtures say what the simulator cannot show (see each docstring); the tests read them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest
from conftest import LabBackend, base_spec, options
from guestlab import GuestLab
from vmenv_vsphere import VsphereBackend

from pytest_vmenv.spec import MachineSpec
from pytest_vmenv.testing import BackendConformance


class TestVsphereConformance(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, lab_backend: LabBackend) -> Iterator[LabBackend]:
        yield lab_backend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_factory(
        cls, vcsim: dict[str, str], vcsim_password: str
    ) -> Callable[[], VsphereBackend]:
        """The plain backend on the same vcsim: it finds and destroys VMs (no guest needed)."""
        return functools.partial(VsphereBackend, options(vcsim, vcsim_password), environ={})

    @pytest.fixture(scope="class")
    @classmethod
    def second_backend(
        cls, vcsim: dict[str, str], vcsim_password: str, lab: GuestLab
    ) -> Callable[[], LabBackend]:
        """Another instance whose clones reach their guests in the lab, as ``backend``'s do."""

        def make() -> LabBackend:
            backend = LabBackend(
                options(vcsim, vcsim_password, ssh_key=str(lab.key_path)), environ={}
            )
            backend.lab = lab
            backend.check()
            return backend

        return make

    @pytest.fixture(scope="class")
    @classmethod
    def base_spec(cls) -> MachineSpec:
        return base_spec()

    @pytest.fixture(scope="class")
    @classmethod
    def reverts_files(cls) -> bool:
        """False: vcsim's CreateSnapshot_Task/RevertToSnapshot_Task only change the
        inventory's snapshot tree; its VMs have no disk whose contents a revert could restore
        (proven at the API level in test_vsphere.py instead)."""
        return False
