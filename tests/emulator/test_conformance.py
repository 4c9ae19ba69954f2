"""The shared backend conformance suite, run against the real emulator."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
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
    state = Path("/var/lib/pytest-vmenv-test") / f"conformance-{uuid.uuid4().hex[:8]}"

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> Iterator[EmulatorBackend]:
        mp = pytest.MonkeyPatch()
        mp.setenv("VMENV_STATE_DIR", str(cls.state))
        backend = EmulatorBackend(state_dir=cls.state)
        backend.check()
        yield backend
        backend.close()
        mp.undo()
        shutil.rmtree(cls.state, ignore_errors=True)

    @pytest.fixture(scope="class")
    @classmethod
    def backend_factory(cls) -> Callable[[], EmulatorBackend]:
        return functools.partial(EmulatorBackend, state_dir=cls.state)

    @pytest.fixture(scope="class")
    @classmethod
    def base_spec(cls) -> MachineSpec:
        return MachineSpec(image="host")
