"""The fixtures a test author uses: ``vm``, ``vms``, ``vm_factory``, ``vmenv_backend``, and
``module_vm``/``module_vms``/``session_vm``/``session_vms`` for fixtures of those scopes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .backend import Backend
from .errors import BackendUnavailable, VmenvError
from .machine import Machine
from .session_plugin import VmenvPlugin, plugin_key
from .tracebacks import clean_setup, hide, trimmed

__all__ = [
    "VmFactory",
    "module_vm",
    "module_vms",
    "session_vm",
    "session_vms",
    "vm",
    "vm_factory",
    "vmenv_backend",
    "vms",
]


class VmFactory:
    """Creates machines imperatively; all of them are destroyed at session end."""

    def __init__(self, plugin: VmenvPlugin) -> None:
        self._plugin = plugin

    def create(self, image: str = "host", name: str = "vm", **spec: Any) -> Machine:
        """``create(image=..., name=..., cpus=..., ...)``: the fields of the ``vm`` marker.

        A failure raises its :class:`~pytest_vmenv.errors.VmenvError` (``ProvisionError``,
        ``BootTimeout``...), shown at the caller's line (see :mod:`.tracebacks`).
        """
        __tracebackhide__ = hide
        try:
            return self._plugin.factory_create({"image": image, "name": name, **spec})
        except VmenvError as exc:
            raise trimmed(exc)  # noqa: B904 - trimmed() decides what chain to show

    def destroy(self, machine: Machine) -> None:
        """Destroy ``machine`` now, through the orchestrator (its ledger record goes too)."""
        __tracebackhide__ = hide
        try:
            self._plugin.orchestrator.destroy(machine)
        except VmenvError as exc:
            raise trimmed(exc)  # noqa: B904 - trimmed() decides what chain to show


@pytest.fixture(scope="session")
def vm_factory(pytestconfig: pytest.Config) -> VmFactory:
    """Session-scoped factory: ``vm_factory.create(image="host", name="db", cpus=2)``."""
    return VmFactory(pytestconfig.stash[plugin_key])


@pytest.fixture
def vms(request: pytest.FixtureRequest) -> Iterator[dict[str, Machine]]:
    """Every machine of the test, by name.

    A machine that cannot be made fails the test's setup with the plugin's message (the
    step, its output, the console tail), not a traceback through the plugin.
    """
    plugin = request.config.stash[plugin_key]
    yield clean_setup(lambda: plugin.machines_for(request.node))


@pytest.fixture
def vm(vms: dict[str, Machine]) -> Machine:
    """The machine of a test that has exactly one (checked at collection time)."""
    (machine,) = vms.values()
    return machine


def _only(machines: dict[str, Machine], scope: str, request: pytest.FixtureRequest) -> Machine:
    if len(machines) != 1:
        where = f"module {request.node.nodeid}" if scope == "module" else "this session"
        pytest.fail(
            f"{scope}_vm: {where} has {len(machines)} machines with scope={scope!r} "
            f"({', '.join(sorted(machines))}); use {scope}_vms['NAME']",
            pytrace=False,
        )
    (machine,) = machines.values()
    return machine


@pytest.fixture(scope="module")
def module_vms(request: pytest.FixtureRequest) -> dict[str, Machine]:
    """The machines of the module's ``scope="module"`` marks, by name, for module-scoped
    fixtures (``vm``/``vms`` are per test): start a service once, and every test of the
    module gets that same machine from ``vm``/``vms``::

        @pytest.fixture(scope="module")
        def web(module_vm):
            module_vm.succeed("nohup python3 -m http.server 8000 >/dev/null 2>&1 &")
            module_vm.wait_for_port(8000)
            return module_vm
    """
    plugin = request.config.stash[plugin_key]
    return clean_setup(lambda: plugin.scope_machines(request, "module"))


@pytest.fixture(scope="module")
def module_vm(module_vms: dict[str, Machine], request: pytest.FixtureRequest) -> Machine:
    """The module's one ``scope="module"`` machine (see ``module_vms``)."""
    return _only(module_vms, "module", request)


@pytest.fixture(scope="session")
def session_vms(request: pytest.FixtureRequest) -> dict[str, Machine]:
    """The machines of ``scope="session"`` marks, by name, for session-scoped fixtures
    (one set per xdist worker, as for the tests)."""
    plugin = request.config.stash[plugin_key]
    return clean_setup(lambda: plugin.scope_machines(request, "session"))


@pytest.fixture(scope="session")
def session_vm(session_vms: dict[str, Machine], request: pytest.FixtureRequest) -> Machine:
    """The session's one ``scope="session"`` machine (see ``session_vms``)."""
    return _only(session_vms, "session", request)


@pytest.fixture(scope="session")
def vmenv_backend(pytestconfig: pytest.Config) -> Backend:
    """The active default backend object (``--vm-backend``, vmenv.toml, else emulator)."""
    plugin = pytestconfig.stash[plugin_key]
    name = plugin.parser.default_backend
    try:
        return plugin.orchestrator.backend(name)
    except BackendUnavailable as exc:
        if plugin.options.unavailable == "skip":
            pytest.skip(str(exc))
        raise
