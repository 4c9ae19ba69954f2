"""BackendConformance: the one test suite every backend must pass, against the real engine.

Laid out as fsspec's ``tests/abstract``: :class:`ConformanceFixtures` names what a backend's
test class must give (its required fixtures raise ``NotImplementedError`` saying what to
return) and the capability fixtures the tests read; one mixin per area holds the tests.
:class:`BackendConformance` is all of them::

    import functools

    import pytest
    from pytest_vmenv.emulator import EmulatorBackend
    from pytest_vmenv.spec import MachineSpec
    from pytest_vmenv.testing import BackendConformance

    class TestEmulator(BackendConformance):
        @pytest.fixture(scope="class")
        @classmethod
        def backend(cls):
            backend = EmulatorBackend()
            backend.check()
            yield backend
            backend.close()

        @pytest.fixture(scope="class")
        @classmethod
        def backend_factory(cls):
            return functools.partial(EmulatorBackend)

        @pytest.fixture(scope="class")
        @classmethod
        def base_spec(cls):
            return MachineSpec(image="host")

A backend that cannot show something here overrides the capability fixture that says so
(``reverts_files``, ``other_user``, ...; ``capabilities`` defaults to
``backend.capabilities()``), and the tests that need it adapt or skip themselves. A class
may also take only some areas: ``class TestX(ConformanceFixtures, CommandTests)``.
"""

from __future__ import annotations

from .commands import CommandTests
from .files import FileTests
from .fixtures import ConformanceFixtures, MachineMaker
from .lifecycle import LifecycleTests
from .networks import NetworkTests
from .ownership import OwnershipTests
from .snapshots import SnapshotTests

__all__ = [
    "BackendConformance",
    "CommandTests",
    "ConformanceFixtures",
    "FileTests",
    "LifecycleTests",
    "MachineMaker",
    "NetworkTests",
    "OwnershipTests",
    "SnapshotTests",
]


class BackendConformance(
    ConformanceFixtures,
    NetworkTests,
    OwnershipTests,
    SnapshotTests,
    FileTests,
    CommandTests,
    LifecycleTests,
):
    """Lifecycle, commands, files, snapshots, ownership and networks, on a real backend.

    pytest collects the tests of the last base first: the areas run in the order of the
    docstring, the basics before what builds on them.
    """
