"""Fixtures shared by the emulator's real-namespace test modules.

Each module gets a state dir of its own under ``/var/lib/pytest-vmenv-test`` (never /tmp),
one backend, one session and one ``host`` template. A module that needs other behaviour
(e.g. an assertion at backend close) defines its own fixture of the same name.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmenv.backend import Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec

TEST_ROOT = Path("/var/lib/pytest-vmenv-test")


@pytest.fixture(scope="module")
def state(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The module's state dir (``VMENV_STATE_DIR`` while it runs), removed after it."""
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    path = TEST_ROOT / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("VMENV_STATE_DIR", str(path))
    yield path
    mp.undo()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def backend(state: Path) -> Iterator[EmulatorBackend]:
    b = EmulatorBackend(state_dir=state)
    b.check()
    yield b
    b.close()


@pytest.fixture(scope="module")
def session(state: Path) -> Session:
    return Session(id=f"s-{uuid.uuid4().hex[:8]}", state_dir=state)


@pytest.fixture(scope="module")
def template(backend: EmulatorBackend, session: Session) -> Snapshot:
    return backend.build_template(MachineSpec(name="vm"), "host-plain", session)
