"""The plugin's state in one session: configuration, spec parsing, the orchestrator, and the
hooks that need them (collection-time validation, template builds, teardown, the summary).

Everything is built on first need: a session that declares no machine creates no backend and
no orchestrator. :data:`plugin_key` finds the :class:`VmenvPlugin` of a ``pytest.Config``.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Generator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .backend import Backend
from .backend import Session as VmenvSession
from .collect import needs_machines, scope_specs, specs_for
from .config import VmenvConfig, load_config
from .errors import BackendUnavailable, ConfigError
from .keys import machines_key, specs_key
from .machine import Machine
from .options import Options
from .paths import state_dir
from .progress import TerminalProgress
from .registry import Registry, not_installed
from .signals import GracefulSignals
from .spec import MachineSpec, SpecParser
from .summary import WORKEROUTPUT_KEY, Summary

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

__all__ = ["VmenvPlugin", "XdistHooks", "plugin_key"]


class XdistHooks:
    """Hands the controller's session id to every xdist worker (one session, many workers)
    and gathers what each worker's summary says when it finishes."""

    def __init__(self, plugin: VmenvPlugin) -> None:
        self.plugin = plugin

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["vmenv_session_id"] = self.plugin.session_id

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """Fold a finished worker's summary (kept machines, timings...) into the session's."""
        data = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_KEY)
        if data is not None:
            self.plugin.summary.merge(Summary.from_data(data))


def _new_session_id() -> str:
    return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)


class VmenvPlugin:
    """Per-session state: configuration, spec parsing, the orchestrator."""

    def __init__(self, config: pytest.Config, options: Options) -> None:
        self.config = config
        self.options = options
        workerinput = getattr(config, "workerinput", None)
        self.worker_id = workerinput["workerid"] if workerinput else "master"
        self.session_id = (
            workerinput["vmenv_session_id"]
            if workerinput and "vmenv_session_id" in workerinput
            else _new_session_id()
        )
        self._vmenv_config: VmenvConfig | None = None
        self._registry: Registry | None = None
        self._parser: SpecParser | None = None
        self._orchestrator: Orchestrator | None = None
        self._progress: TerminalProgress | None = None
        self._factory_ids = itertools.count()
        self._next_specs: dict[str, list[MachineSpec]] = {}
        self._signals = GracefulSignals()
        self.summary = Summary()  # this process's, plus every finished xdist worker's

    # -- lazily built parts -----------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry()
        return self._registry

    @property
    def vmenv_config(self) -> VmenvConfig:
        if self._vmenv_config is None:
            self._vmenv_config = load_config(
                Path(self.config.rootpath),
                self.options.config,
                cli_vars=self.options.vars,
                worker_id=self.worker_id,
                session_id=self.session_id,
            )
        return self._vmenv_config

    @property
    def parser(self) -> SpecParser:
        if self._parser is None:
            default = self.options.backend or self.vmenv_config.backend or "emulator"
            if default not in self.registry:
                raise ConfigError(
                    f"backend {default!r} (--vm-backend / VMENV_BACKEND / vmenv.toml backend) "
                    + not_installed(default, self.registry)
                )
            self._parser = SpecParser(self.vmenv_config, default, self.registry)
        return self._parser

    @property
    def orchestrator(self) -> Orchestrator:
        if self._orchestrator is None:
            from .orchestrator import Orchestrator  # a session without machines never needs it
            from .reports import MachineHooks

            session = VmenvSession(
                id=self.session_id,
                state_dir=state_dir(),
                worker_id=self.worker_id,
                reuse=self.options.reuse,
            )
            self._progress = TerminalProgress(self.config)
            self._orchestrator = Orchestrator(
                session,
                self._make_backend,
                parallel=self.options.parallel,
                keep=self.options.keep,
                on_template=self._template_built,
                on_wait=self._progress.pump,
            )
            self.config.pluginmanager.register(MachineHooks(self._orchestrator), "vmenv-machines")
            self._signals.install()
        return self._orchestrator

    def _make_backend(self, name: str) -> Backend:
        cls = self.registry.load(name)
        options = self.vmenv_config.backends.get(name, {})
        if name == "kvm" and not options:
            options = self.vmenv_config.backends.get("libvirt", {})
        backend: Backend = self.config.hook.pytest_vmenv_make_backend(
            name=name, cls=cls, options=options, config=self.config
        )
        return backend

    def _template_built(self, spec: MachineSpec, snapshot: Any, seconds: float) -> None:
        self.config.hook.pytest_vmenv_template_built(spec=spec, snapshot=snapshot, seconds=seconds)

    # -- collection -------------------------------------------------------------------------

    def specs_for(self, item: pytest.Item) -> list[MachineSpec]:
        """Machines of ``item``: the closest level with ``vm`` marks, plus a ``vmenv`` mark."""
        return specs_for(self.parser, item)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        errors = []
        for item in items:
            if not needs_machines(item):
                continue
            try:
                item.stash[specs_key] = self.specs_for(item)
            except ConfigError as exc:
                errors.append(str(exc))
        if errors:
            more = f"\n(and {len(errors) - 10} more)" if len(errors) > 10 else ""
            raise pytest.UsageError("pytest-vmenv:\n" + "\n".join(errors[:10]) + more)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        if not session.config.option.collectonly:
            self._prepare(session.items)
        return (yield)

    def _prepare(self, items: list[pytest.Item]) -> None:
        """Start building every template the selected tests will clone, in parallel."""
        wanted: list[MachineSpec] = []
        per_item: list[list[MachineSpec]] = []
        for item in items:
            uses = getattr(item, "fixturenames", ())
            specs: list[MachineSpec] = []
            if "vm" in uses or "vms" in uses:
                specs = item.stash.get(specs_key, [])
            elif "module_vms" in uses or "session_vms" in uses:  # through module_vm ...
                specs = [s for s in item.stash.get(specs_key, []) if s.scope != "function"]
            per_item.append(specs)
            wanted += specs
        if not wanted:
            return
        from .spares import WARM_AHEAD

        for i, item in enumerate(items):  # what to clone in the background during each test
            ahead = [s for specs in per_item[i + 1 : i + 1 + WARM_AHEAD] for s in specs]
            if ahead:
                self._next_specs[item.nodeid] = ahead
        orchestrator = self.orchestrator
        for spec in wanted:
            if orchestrator.unavailable(spec.backend) is None:
                orchestrator.prepare([spec])

    # -- machines for a test ----------------------------------------------------------------

    def machines_for(self, item: pytest.Item) -> dict[str, Machine]:
        if machines_key in item.stash:
            return item.stash[machines_key]
        specs: list[MachineSpec] = item.stash.get(specs_key, [])
        if not specs:
            item.stash[machines_key] = {}
            return {}
        module = item.getparent(pytest.Module)
        scope_keys = {
            "function": item.nodeid,
            "module": module.nodeid if module else "",
            "session": "",
        }
        item.stash[machines_key] = {}
        machines = self._acquire(item.nodeid, specs, scope_keys)
        item.stash[machines_key] = machines
        self.orchestrator.warm(self._next_specs.get(item.nodeid, []))
        for machine in machines.values():
            self.config.hook.pytest_vmenv_machine_ready(machine=machine, item=item)
        return machines

    def _acquire(
        self, where: str, specs: list[MachineSpec], scope_keys: Mapping[str, str]
    ) -> dict[str, Machine]:
        """Machines for ``specs``, or a skip/failure naming ``where`` if one cannot be made."""
        orchestrator = self.orchestrator
        for spec in specs:
            reason = orchestrator.unavailable(spec.backend)
            if reason is not None:
                self._unavailable(where, f"backend {spec.backend!r} is unavailable: {reason}")
            reason = orchestrator.unavailable_for(spec)
            if reason is not None:
                self._unavailable(
                    where, f"machine {spec.name!r} ({spec.backend}) cannot be made here: {reason}"
                )
        try:
            return orchestrator.acquire(specs, scope_keys)
        except BackendUnavailable as exc:  # a backend that finds out only while making it
            self._unavailable(where, str(exc))

    def _unavailable(self, where: str, message: str) -> NoReturn:
        """Skip (``--vm-unavailable skip``) or fail the test with one line: what and why."""
        if self.options.unavailable == "skip":
            pytest.skip(message)
        pytest.fail(f"{where}: {message} (--vm-unavailable=skip skips such tests)", pytrace=False)

    @pytest.hookimpl(trylast=True)  # after the runner tore fixtures down: they may use machines
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._orchestrator is None:
            return
        try:
            errors = self._orchestrator.close()
        finally:
            self._signals.restore()
            if self._progress is not None:
                self._progress.close()
        summary = self._orchestrator.summary(errors)
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller writes the summary
            workeroutput[WORKEROUTPUT_KEY] = summary.to_data()
        self.summary.merge(summary)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        self.summary.write(terminalreporter, self.session_id)

    # -- imperative machines ----------------------------------------------------------------

    def factory_create(self, fields: Mapping[str, Any]) -> Machine:
        spec = self.parser.machine(dict(fields), "vm_factory.create()")
        spec_session = spec if spec.scope == "session" else replace(spec, scope="session")
        owner = f"factory-{next(self._factory_ids)}"
        machines = self.orchestrator.acquire(
            [spec_session], {"function": owner, "module": owner, "session": owner}
        )
        return machines[spec.name]

    # -- machines of a module or of the session, for fixtures of that scope --------------------

    def scope_machines(self, request: pytest.FixtureRequest, scope: str) -> dict[str, Machine]:
        """The machines of ``scope`` ("module"/"session") where ``request`` is, by name.

        They are the machines the tests there get from marks with that scope, so the very
        objects ``vm``/``vms`` hand those tests: the specs come from the selected tests' marks
        (of ``request``'s module, or of the whole session), and the orchestrator's scope key
        ("module:<module nodeid>", "session:") is the one ``machines_for`` uses.
        """
        node = request.node
        if scope == "module":
            where, owner = f"module {node.nodeid}", node.nodeid
        else:
            where, owner = "this session", ""
        specs = scope_specs(request, scope, where)
        keys = {"function": f"{scope}-fixture:{owner}", "module": owner, "session": ""}
        machines = self._acquire(f"{request.fixturename} ({where})", specs, keys)
        for machine in machines.values():
            self.config.hook.pytest_vmenv_machine_ready(machine=machine, item=None)
        return machines


plugin_key = pytest.StashKey[VmenvPlugin]()
"""The session's :class:`VmenvPlugin`, in ``config.stash``."""
