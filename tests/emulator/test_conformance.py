"""The shared backend conformance suite, run against the real emulator."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec
from pytest_vmenv.testing import BackendConformance

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's real-namespace tests need Linux and root",
)


class TestEmulatorConformance(BackendConformance):
    @pytest.fixture(scope="class")
    def backend(self) -> Iterator[EmulatorBackend]:
        state = Path("/var/lib/pytest-vmenv-test") / f"conformance-{uuid.uuid4().hex[:8]}"
        mp = pytest.MonkeyPatch()
        mp.setenv("VMENV_STATE_DIR", str(state))
        backend = EmulatorBackend(state_dir=state)
        backend.check()
        yield backend
        backend.close()
        mp.undo()
        shutil.rmtree(state, ignore_errors=True)

    @pytest.fixture(scope="class")
    def base_spec(self) -> MachineSpec:
        return MachineSpec(image="host")
