"""The pytest plugin (the ``pytest11`` entry point): options, markers, hookspecs, fixtures.

It costs next to nothing in a session that declares no machine: it registers a
:class:`~pytest_vmenv.session_plugin.VmenvPlugin`, which creates configuration, backends and
the orchestrator on first need only. Imports run one way: this module -> :mod:`.fixtures` ->
:mod:`.session_plugin` -> :mod:`.keys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from . import tracebacks
from .backend import Backend
from .errors import ConfigError
from .fixtures import (
    VmFactory,
    module_vm,
    module_vms,
    session_vm,
    session_vms,
    vm,
    vm_factory,
    vmenv_backend,
    vms,
)
from .keys import machines_key, specs_key
from .options import Options, add_options
from .session_plugin import VmenvPlugin, XdistHooks, plugin_key

__all__ = [
    "VmFactory",
    "VmenvPlugin",
    "machines_key",
    "module_vm",
    "module_vms",
    "plugin_key",
    "session_vm",
    "session_vms",
    "specs_key",
    "vm",
    "vm_factory",
    "vmenv_backend",
    "vms",
]

VM_MARKER = (
    'vm(image="host", *, name="vm", backend=None, cpus=1, memory="512M", disk=None, '
    'network=None, packages=(), init=None, provision=(), ready=None, scope="function", '
    'isolation="clone", timeout=300, labels=None): give the test a machine (fixtures vm, '
    "vms); several marks with distinct names make one environment"
)
VMENV_MARKER = "vmenv(name): give the test the machines of [environments.NAME] in vmenv.toml"


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", VM_MARKER)
    config.addinivalue_line("markers", VMENV_MARKER)
    try:
        options = Options.from_config(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    tracebacks.configure(config, options.debug)
    plugin = VmenvPlugin(config, options)
    config.stash[plugin_key] = plugin
    config.pluginmanager.register(plugin, "vmenv-session")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(plugin), "vmenv-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    tracebacks.unconfigure()


@pytest.hookimpl(trylast=True)
def pytest_vmenv_make_backend(
    name: str, cls: type[Any], options: Mapping[str, Any], config: pytest.Config
) -> Backend:
    backend: Backend = cls(options)
    return backend
