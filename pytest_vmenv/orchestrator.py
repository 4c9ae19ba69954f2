"""Templates, clones, scopes and teardown: the machine lifecycle of one pytest session.

* A template is built once per distinct key (a hash of everything that shapes its disk), up
  front and in parallel as soon as the selected tests are known, then cloned for every test
  (see :mod:`.templates`; spares for the next tests are cloned ahead, see :mod:`.spares`).
* ``scope="function"`` machines live for one test; ``"module"``/``"session"`` ones are
  shared and released when their scope ends. ``isolation="revert"`` keeps one machine per
  spec and reverts it to its template after each test instead of cloning anew.
* Backends are made, checked and asked about specs once (:mod:`.session_backends`); what
  one cannot do (its :class:`~pytest_vmenv.backend.Capabilities`) is acted on: ``network=``
  without private networks gets one warning.
* Teardown releases every machine in its own ``try``: one failing destroy never keeps the
  others alive; the errors are raised together afterwards.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TypeVar

from .backend import (
    Backend,
    Capabilities,
    Closer,
    MachineRef,
    Network,
    Session,
    Snapshot,
    Summarizer,
)
from .errors import BackendUnavailable, VmenvError
from .ledger import Ledger, file_lock, owners
from .machine import Machine
from .readiness import wait_ready
from .reaper import SweepReport, Watchdog, close_session
from .session_backends import SessionBackends
from .spares import WARM_AHEAD, Spares
from .spec import MachineSpec
from .summary import Summary, Timing, Timings
from .templates import TemplateCallback, Templates, spec_identity, template_key

__all__ = ["WARM_AHEAD", "Orchestrator", "TeardownError", "template_key"]

_T = TypeVar("_T")


class TeardownError(VmenvError):
    """One or more machines could not be released; each failure is listed."""


def _attempt(errors: list[str], what: str, fn: Callable[[], object]) -> None:
    """``fn()``; a failure is appended to ``errors`` as ``what: error`` (teardown goes on)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every release gets its own try
        errors.append(f"{what}: {exc}")


class Orchestrator:
    """Owns every backend, template and machine of one session (one xdist worker)."""

    def __init__(
        self,
        session: Session,
        make_backend: Callable[[str], Backend],
        *,
        parallel: int = 2,
        keep: str = "never",
        on_template: TemplateCallback | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.session = session
        self.keep_mode = keep
        self.kept: list[Machine] = []
        self.notes: list[str] = []
        self._tainted: set[str] = set()
        self._detached: list[Machine] = []
        self.ledger = Ledger(session)
        self.ledger.open()
        self._watchdog = Watchdog(session)
        self.backends = SessionBackends(session, self.ledger, make_backend)
        self._lock = threading.RLock()
        self._scoped: dict[str, dict[str, Machine]] = defaultdict(dict)
        self._pool: dict[str, Machine] = {}
        self._timings = Timings()
        self.templates = Templates(
            session,
            self.ledger,
            self.backend,
            self._timings,
            parallel=parallel,
            on_template=on_template,
            on_wait=on_wait,
        )
        self._spares = Spares(self._clone, self._destroy, self._makeable)
        self.scratch = session.state_dir / "scratch" / f"{session.id}-{session.worker_id}"
        self.scratch.mkdir(parents=True, exist_ok=True)

    @property
    def timings(self) -> list[Timing]:
        return self._timings.timings

    # -- backends ---------------------------------------------------------------------------

    def backend(self, name: str) -> Backend:
        """The backend ``name``, created and checked once; raises BackendUnavailable."""
        return self.backends.get(name)

    def capabilities(self, name: str) -> Capabilities:
        """What the backend ``name`` can do (see :meth:`.SessionBackends.capabilities`)."""
        return self.backends.capabilities(name)

    def unavailable(self, name: str) -> str | None:
        """Why backend ``name`` cannot run here, or None if it can."""
        return self.backends.unavailable(name)

    def unavailable_for(self, spec: MachineSpec) -> str | None:
        """Why ``spec``'s machine cannot be made here, or None if it can."""
        return self.backends.unavailable_for(spec)

    def _makeable(self, spec: MachineSpec) -> bool:
        return self.unavailable(spec.backend) is None and self.unavailable_for(spec) is None

    def _check_spec(self, spec: MachineSpec) -> None:
        """Raise BackendUnavailable if the machine of ``spec`` cannot be made here."""
        reason = self.unavailable(spec.backend) or self.unavailable_for(spec)
        if reason is not None:
            raise BackendUnavailable(spec.backend, reason)

    # -- templates --------------------------------------------------------------------------

    def prepare(self, specs: Iterable[MachineSpec]) -> None:
        """Start building the templates of ``specs`` in the background (parallel).

        A spec whose machine cannot be made here is left out: its refusal must not become
        the build result of a template that other specs share."""
        for spec in specs:
            if self._makeable(spec):
                self.templates.start(spec)

    def template(self, spec: MachineSpec) -> Snapshot:
        """The template for ``spec``; waits for its build (and raises what the build raised)."""
        return self.templates.get(spec)

    # -- machines ---------------------------------------------------------------------------

    def acquire(
        self, specs: Sequence[MachineSpec], scope_keys: Mapping[str, str]
    ) -> dict[str, Machine]:
        """Machines for one test. ``scope_keys`` maps a scope to the id of its current owner
        (``{"function": nodeid, "module": module nodeid, "session": ""}``).

        Raises BackendUnavailable before anything is made if one of ``specs`` cannot be."""
        for spec in specs:
            self._check_spec(spec)
        for spec in specs:
            self.backends.warn_fallbacks(spec)
        machines: dict[str, Machine] = {}
        try:
            for spec in specs:
                machines[spec.name] = self._acquire_one(spec, scope_keys)
        except BaseException:
            self.release(f"function:{scope_keys['function']}")
            raise
        return machines

    def _acquire_one(self, spec: MachineSpec, scope_keys: Mapping[str, str]) -> Machine:
        owner = f"{spec.scope}:{scope_keys[spec.scope]}"
        network = None
        if spec.network is not None:
            network = Network(spec.network, hashlib.sha256(owner.encode()).hexdigest()[:10])
        if spec.scope == "function" and spec.isolation == "revert":
            return self._pooled(spec, network)
        ident = spec_identity(spec)
        with self._lock:
            machine = self._scoped[owner].get(ident)
        if machine is not None:
            return machine
        machine = self._spares.take(spec) or self._clone(spec, network)
        with self._lock:
            self._scoped[owner][ident] = machine
        return machine

    def _pooled(self, spec: MachineSpec, network: Network | None) -> Machine:
        """The one machine of an ``isolation="revert"`` spec, back at its template."""
        pool_key = spec_identity(spec)
        with self._lock:
            machine = self._pool.get(pool_key)
        if machine is None:
            machine = self._clone(spec, network)
            with self._lock:
                self._pool[pool_key] = machine
            return machine
        pooled = machine  # used by an earlier test: back to the template first
        self._timed("revert", spec, lambda: pooled.revert(self.template(spec)))
        return machine

    def warm(self, specs: Sequence[MachineSpec]) -> None:
        """Clone spares of ``specs`` (the next tests' machines) in the background."""
        self._spares.warm(specs)

    def _backend_clone(
        self, backend: Backend, snapshot: Snapshot, spec: MachineSpec, network: Network | None
    ) -> MachineRef:
        """``clone``, given ``network`` only when there is one (a backend without networks
        may take the protocol's first three arguments only)."""
        if network is None:
            return backend.clone(snapshot, spec, self.session)
        return backend.clone(snapshot, spec, self.session, network=network)

    def _clone(self, spec: MachineSpec, network: Network | None = None) -> Machine:
        backend = self.backend(spec.backend)
        snapshot = self.template(spec)
        deadline = time.monotonic() + spec.timeout
        intent = self.ledger.intend("machine", backend.name, spec.name)
        try:
            ref = self._timed(
                "clone", spec, partial(self._backend_clone, backend, snapshot, spec, network)
            )
        except BaseException:
            self.ledger.forget(intent)
            raise
        self.ledger.update(intent, id=ref.id)
        machine = Machine(backend, ref, spec, scratch=self.scratch)
        machine.intent = intent
        if spec.ready:
            try:
                self._timed("ready", spec, lambda: wait_ready(machine, deadline))
            except BaseException:
                self._destroy(machine)
                raise
        return machine

    def release(self, owner: str) -> None:
        """Release the machines of one scope owner (``"function:<nodeid>"`` ...)."""
        with self._lock:
            machines = list(self._scoped.pop(owner, {}).values())
        errors: list[str] = []
        for machine in machines:
            what = f"{machine.name} ({machine.ref.id})"
            _attempt(errors, what, partial(self._release, machine))
        if errors:
            raise TeardownError("could not destroy:\n  " + "\n  ".join(errors))

    def destroy(self, machine: Machine) -> None:
        """Destroy ``machine`` now (``vm_factory.destroy``), whatever ``--vm-keep`` says."""
        with self._lock:
            for group in self._scoped.values():
                for ident, held in list(group.items()):
                    if held is machine:
                        del group[ident]
        self._destroy(machine)

    def _destroy(self, machine: Machine) -> None:
        self._timed("teardown", machine.spec, lambda: machine.backend.destroy(machine.ref))
        if machine.intent is not None:
            self.ledger.forget(machine.intent)

    def taint(self, machines: Iterable[Machine]) -> None:
        """Mark machines of a failed test (``--vm-keep failed`` keeps them)."""
        with self._lock:
            for machine in machines:
                self._tainted.add(machine.ref.id)
                for key, pooled in list(self._pool.items()):
                    if pooled is machine and self.keep_mode == "failed":
                        del self._pool[key]  # not reverted for the next test: kept as it failed
                        self._detached.append(machine)

    def _release(self, machine: Machine) -> None:
        """Destroy a machine, or keep it if ``--vm-keep`` says so."""
        if self.keep_mode == "always" or (
            self.keep_mode == "failed" and machine.ref.id in self._tainted
        ):
            machine.backend.keep(machine.ref)
            with self._lock:
                self.kept.append(machine)
            if machine.intent is not None:
                self.ledger.update(machine.intent, kept=True)
            return
        self._destroy(machine)

    # -- the end of the session -------------------------------------------------------------

    def close(self) -> list[str]:
        """Destroy every machine and (unless reused) every template; return the failures."""
        errors: list[str] = []
        for machine in self._spares.close():  # spares belong to no test: never kept
            what = f"machine {machine.name} ({machine.ref.id})"
            _attempt(errors, what, partial(self._destroy, machine))
        with self._lock:
            machines = [m for group in self._scoped.values() for m in group.values()]
            machines += list(self._pool.values()) + self._detached
            self._scoped.clear()
            self._pool.clear()
            self._detached = []
        for machine in machines:
            what = f"machine {machine.name} ({machine.ref.id})"
            _attempt(errors, what, partial(self._release, machine))
        self.templates.shutdown()
        errors += self._remove_templates()
        for name, backend in self.backends.made().items():
            if isinstance(backend, Summarizer):
                _attempt(errors, f"backend {name}: summary", partial(self._note, backend.summary))
            if isinstance(backend, Closer):
                _attempt(errors, f"backend {name}", backend.close)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._watchdog.goodbye()
        return errors

    def _note(self, lines: Callable[[], Iterable[object]]) -> None:
        self.notes += [str(line) for line in lines()]

    def _remove_templates(self) -> list[str]:
        """Leave the ledger; the session's last process out removes its templates."""
        state = self.session.state_dir
        with file_lock(state, f"session-{self.session.id}"):
            self.ledger.goodbye()
            if self.session.reuse or any(r.alive for r in owners(state, self.session.id)):
                return []
            report = SweepReport()
            close_session(self.backends.made().values(), state, self.session.id, report)
        return report.errors

    def summary(self, errors: Iterable[str] = ()) -> Summary:
        """What this (closed) orchestrator did; ``errors``: what :meth:`close` returned."""
        return Summary(
            notes=list(self.notes),
            swept=list(self.backends.swept),
            kept=[
                f"{m.name} ({m.backend.name}, {m.ref.id}): vmenv shell {m.ref.id}"
                for m in self.kept
            ],
            errors=list(errors),
            timings=list(self.timings),
        )

    # -- timings ----------------------------------------------------------------------------

    def _timed(self, phase: str, spec: MachineSpec, fn: Callable[[], _T]) -> _T:
        return self._timings.timed(phase, spec.backend, spec.name, fn)
