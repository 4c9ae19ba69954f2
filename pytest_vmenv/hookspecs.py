"""Hooks that plugins and conftest.py files implement to extend pytest-vmenv.

Every hook is prefixed ``pytest_vmenv_``; each docstring is its contract and has an example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .backend import Backend, Snapshot
    from .machine import Machine
    from .spec import MachineSpec


@pytest.hookspec(firstresult=True)
def pytest_vmenv_make_backend(
    name: str, cls: type[Any], options: Mapping[str, Any], config: pytest.Config
) -> Backend | None:
    """Create the backend object for ``name``; the first non-None result wins.

    The built-in implementation (``trylast``) calls ``cls(options)`` with the backend's table
    from ``[tool.vmenv.backends.NAME]``. Override it to wrap or configure a backend::

        def pytest_vmenv_make_backend(name, cls, options, config):
            if name == "libvirt":
                return cls({**options, "uri": "qemu+ssh://ci-host/system"})
    """


def pytest_vmenv_template_built(spec: MachineSpec, snapshot: Snapshot, seconds: float) -> None:
    """Called after a template was built (or found reusable) for ``spec``::

    def pytest_vmenv_template_built(spec, snapshot, seconds):
        print(f"template {spec.image} ready in {seconds:.1f}s")
    """


def pytest_vmenv_machine_ready(machine: Machine, item: pytest.Item | None) -> None:
    """Called when a machine is running and ready, before the test sees it. ``item`` is the
    test, or None for a machine made for a module/session fixture or by ``vm_factory``::

    def pytest_vmenv_machine_ready(machine, item):
        owner = item.nodeid if item is not None else "a fixture"
        machine.write_text("/etc/motd", f"made for {owner}")
    """
