"""The core's BackendConformance suite against vcsim, with guests from the SSH lab.

Two tests are skipped, each for a limit of the simulator that no backend code can change.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import LabBackend, base_spec

from pytest_vmenv.spec import MachineSpec
from pytest_vmenv.testing import BackendConformance

_NO_DISK = (
    "vcsim limitation: CreateSnapshot_Task/RevertToSnapshot_Task only change the inventory's "
    "snapshot tree; vcsim VMs have no disk whose contents a revert could restore, so the "
    "guest's files cannot go back (proven at the API level in test_vsphere.py instead)"
)


class TestVsphereConformance(BackendConformance):
    @pytest.fixture(scope="class")
    def backend(self, lab_backend: LabBackend) -> Iterator[LabBackend]:
        yield lab_backend

    @pytest.fixture(scope="class")
    def base_spec(self) -> MachineSpec:
        return base_spec()

    @pytest.mark.skip(reason=_NO_DISK)
    def test_snapshot_and_revert(self) -> None: ...

    @pytest.mark.skip(reason=_NO_DISK)
    def test_revert_to_template(self) -> None: ...
