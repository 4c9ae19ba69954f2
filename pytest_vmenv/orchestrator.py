"""Templates, clones, scopes and teardown: the machine lifecycle of one pytest session.

* A template is built once per distinct key (a hash of everything that shapes its disk), up
  front and in parallel as soon as the selected tests are known, then cloned for every test.
* ``scope="function"`` machines live for one test; ``"module"``/``"session"`` ones are
  shared and released when their scope ends. ``isolation="revert"`` keeps one machine per
  spec and reverts it to its template after each test instead of cloning anew.
* Teardown releases every machine in its own ``try``: one failing destroy never keeps the
  others alive; the errors are raised together afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, replace
from typing import Any

from .backend import Backend, Session, Snapshot, SpecCheck
from .diagnose import missing_command, not_found
from .errors import (
    BackendUnavailable,
    BootTimeout,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    ProvisionError,
    VmenvError,
)
from .ledger import Ledger, file_lock, owners
from .machine import Machine
from .reaper import SweepReport, Watchdog, close_session, sweep
from .spec import MachineSpec
from .summary import Timing, timing_lines

__all__ = ["Orchestrator", "TeardownError", "template_key"]

log = logging.getLogger("pytest_vmenv")

WARM_AHEAD = 2  # how many tests ahead machines are cloned while the current test runs


class TeardownError(VmenvError):
    """One or more machines could not be released; each failure is listed."""


def _file_identity(value: str) -> Any:
    """Size and mtime of a file an image points at, so a rebuilt image gets a new key."""
    try:
        st = os.stat(value)
    except OSError:
        return value
    return [value, st.st_size, st.st_mtime_ns]


def template_key(spec: MachineSpec) -> str:
    """Hash of what shapes a template's disk: backend, image identity, provision, disk size,
    the packages baked into a built image and the init it boots."""
    image_config = {
        k: _file_identity(v) if isinstance(v, str) and os.path.isabs(v) else v
        for k, v in sorted(spec.image_config.items())
    }
    shape: dict[str, Any] = {
        "backend": spec.backend,
        "image": spec.image,
        "image_config": image_config,
        "provision": [list(p) if isinstance(p, tuple) else p for p in spec.provision],
        "disk": spec.disk,
    }
    if spec.packages:  # only when set: the keys of specs without them stay as they were
        shape["packages"] = sorted(spec.packages)
    if spec.init is not None:
        shape["init"] = spec.init
    data = json.dumps(shape, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:20]


def _identity(spec: MachineSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True, default=str)


class Orchestrator:
    """Owns every backend, template and machine of one session (one xdist worker)."""

    def __init__(
        self,
        session: Session,
        make_backend: Callable[[str], Backend],
        *,
        parallel: int = 2,
        keep: str = "never",
        on_template: Callable[[MachineSpec, Snapshot, float], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.session = session
        self.keep_mode = keep
        self.kept: list[Machine] = []
        self.swept: list[str] = []
        self.notes: list[str] = []
        self._tainted: set[str] = set()
        self._detached: list[Machine] = []
        self.ledger = Ledger(session)
        self.ledger.open()
        self._watchdog = Watchdog(session)
        self._make_backend = make_backend
        self._backends: dict[str, Backend | BackendUnavailable] = {}
        self._refusals: dict[str, str | None] = {}
        self._templates: dict[str, Future[Snapshot]] = {}
        self._executor = ThreadPoolExecutor(max(1, parallel), thread_name_prefix="vmenv-build")
        self._warmer = ThreadPoolExecutor(WARM_AHEAD, thread_name_prefix="vmenv-warm")
        self._spares: dict[str, list[Future[Machine]]] = defaultdict(list)
        self._closed = False
        self._lock = threading.RLock()
        self._scoped: dict[str, dict[str, Machine]] = defaultdict(dict)
        self._pool: dict[str, Machine] = {}
        self._on_template = on_template
        self._on_wait = on_wait
        self.timings: list[Timing] = []
        self.scratch = session.state_dir / "scratch" / f"{session.id}-{session.worker_id}"
        self.scratch.mkdir(parents=True, exist_ok=True)

    # -- backends ---------------------------------------------------------------------------

    def backend(self, name: str) -> Backend:
        """The backend ``name``, created and checked once; raises BackendUnavailable."""
        with self._lock:
            found = self._backends.get(name)
            if found is None:
                try:
                    found = self._make_backend(name)
                    found.check()
                except BackendUnavailable as exc:
                    found = exc
                else:
                    self._adopt(found)
                self._backends[name] = found
        if isinstance(found, BackendUnavailable):
            raise found
        return found

    def _adopt(self, backend: Backend) -> None:
        """Record a new backend in the ledger, then sweep what dead sessions left on it."""
        self.ledger.add_backend(backend.name, getattr(backend, "options", {}))
        with file_lock(self.session.state_dir, "sweep"):
            report = sweep([backend], self.session.state_dir)
        self.swept += report.removed
        for error in report.errors:
            log.warning("pytest-vmenv: sweep: %s", error)

    def unavailable(self, name: str) -> str | None:
        """Why backend ``name`` cannot run here, or None if it can."""
        try:
            self.backend(name)
        except BackendUnavailable as exc:
            return exc.reason
        return None

    def unavailable_for(self, spec: MachineSpec) -> str | None:
        """Why this backend, running here, cannot make ``spec``'s machine, or None if it can.

        Asked of the backend (:class:`~pytest_vmenv.backend.SpecCheck`) once per distinct
        spec, not per template: two tests that share a template but not ``network=`` get each
        its own answer. None too when the backend itself cannot run (see :meth:`unavailable`).
        """
        ident = _identity(spec)
        with self._lock:
            if ident in self._refusals:
                return self._refusals[ident]
        try:
            backend = self.backend(spec.backend)
        except BackendUnavailable:
            return None
        reason = backend.unavailable_for(spec) if isinstance(backend, SpecCheck) else None
        with self._lock:
            self._refusals[ident] = reason
        return reason

    def _check_spec(self, spec: MachineSpec) -> None:
        """Raise BackendUnavailable if the machine of ``spec`` cannot be made here."""
        reason = self.unavailable(spec.backend) or self.unavailable_for(spec)
        if reason is not None:
            raise BackendUnavailable(spec.backend, reason)

    # -- templates --------------------------------------------------------------------------

    def key(self, spec: MachineSpec) -> str:
        base = template_key(spec)
        return base if self.session.reuse else f"{base}-{self.session.id}"

    def prepare(self, specs: Iterable[MachineSpec]) -> None:
        """Start building the templates of ``specs`` in the background (parallel).

        A spec whose machine cannot be made here is left out: its refusal must not become
        the build result of a template that other specs share."""
        for spec in specs:
            if self.unavailable(spec.backend) is None and self.unavailable_for(spec) is None:
                self._template_future(spec)

    def _template_future(self, spec: MachineSpec) -> Future[Snapshot]:
        key = self.key(spec)
        with self._lock:
            future = self._templates.get(key)
            if future is None:
                future = self._executor.submit(self._build, spec, key)
                self._templates[key] = future
        return future

    def _build(self, spec: MachineSpec, key: str) -> Snapshot:
        backend = self.backend(spec.backend)
        record = self.ledger.template_intent(
            key, backend.name, name=spec.image, reuse=self.session.reuse
        )
        # xdist workers share a session's templates: the first builds, the others wait here
        # and then find it complete (build_template returns an existing template for a key).
        # The time reported is the build's (or the lookup's), not the wait for the lock.
        with file_lock(self.session.state_dir, f"template-{key}"):
            start = time.monotonic()
            snapshot = backend.build_template(spec, key, self.session)
            seconds = time.monotonic() - start
        self.ledger.update(
            record, handle=snapshot.handle, name=snapshot.name, data=dict(snapshot.data)
        )
        self._record("template", spec, seconds)
        if self._on_template:
            self._on_template(spec, snapshot, seconds)
        return snapshot

    def template(self, spec: MachineSpec) -> Snapshot:
        """The template for ``spec``; waits for its build (and raises what the build raised).

        While it waits, and once after, ``on_wait`` is called every half second (the plugin
        shows the progress of image builds from there, on the waiting thread)."""
        future = self._template_future(spec)
        try:
            while self._on_wait is not None:
                try:
                    return future.result(timeout=0.5)
                except FutureTimeout:
                    self._on_wait()
            return future.result()
        finally:
            if self._on_wait is not None:
                self._on_wait()

    # -- machines ---------------------------------------------------------------------------

    def acquire(
        self, specs: Sequence[MachineSpec], scope_keys: Mapping[str, str]
    ) -> dict[str, Machine]:
        """Machines for one test. ``scope_keys`` maps a scope to the id of its current owner
        (``{"function": nodeid, "module": module nodeid, "session": ""}``).

        Raises BackendUnavailable before anything is made if one of ``specs`` cannot be."""
        for spec in specs:
            self._check_spec(spec)
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
        backend_spec = spec
        if spec.network is not None:
            instance = hashlib.sha256(owner.encode()).hexdigest()[:10]
            backend_spec = replace(spec, network=f"{spec.network}#{instance}")
        if spec.scope == "function" and spec.isolation == "revert":
            pool_key = _identity(spec)
            with self._lock:
                machine = self._pool.get(pool_key)
            if machine is None:
                machine = self._clone(spec, backend_spec)
                with self._lock:
                    self._pool[pool_key] = machine
            else:  # used by an earlier test: back to the template first
                pooled = machine
                self._timed("revert", spec, lambda: pooled.revert(self.template(spec)))
            return machine
        ident = _identity(spec)
        with self._lock:
            machine = self._scoped[owner].get(ident)
            waiting = self._spares.get(ident)
            spare = waiting.pop(0) if machine is None and waiting else None
        if machine is not None:
            return machine
        if spare is not None:
            machine = self._check_spare(spare)
        if machine is None:
            machine = self._clone(spec, backend_spec)
        with self._lock:
            self._scoped[owner][ident] = machine
        return machine

    def _check_spare(self, spare: Future[Machine]) -> Machine | None:
        """The spare if it still answers (it may have died while it waited, e.g. with the
        hypervisor connection); else None, and whatever is left of it is destroyed.

        A spare whose build or ``ready=`` failed raises that error: a fresh clone of the same
        spec would only wait out the same failure a second time.
        """
        try:
            machine = spare.result()
        except (BootTimeout, ProvisionError, ConfigError):
            raise
        except Exception:  # noqa: BLE001 - a failed spare is replaced by a fresh clone
            return None
        try:
            machine.backend.execute(machine.ref, ["true"], timeout=machine.spec.timeout)
        except Exception as exc:  # noqa: BLE001
            log.warning("pytest-vmenv: a spare %s was dead (%s); cloning anew", machine.ref.id, exc)
            try:
                self._destroy(machine)
            except Exception as gone:  # noqa: BLE001
                log.warning("pytest-vmenv: could not destroy spare %s: %s", machine.ref.id, gone)
            return None
        return machine

    def warm(self, specs: Sequence[MachineSpec]) -> None:
        """Clone spares of ``specs`` (the next tests' machines) in the background.

        ``specs`` may name one spec several times (the next ``WARM_AHEAD`` tests); spares are
        topped up to that count, so clones overlap the tests before them. Only fresh,
        networkless, function-scoped clones are warmed: a network or a shared machine belongs
        to its owner and cannot be made before the owner exists.
        """
        wanted: dict[str, tuple[MachineSpec, int]] = {}
        for spec in specs:
            if spec.scope != "function" or spec.isolation != "clone" or spec.network:
                continue
            if self.unavailable(spec.backend) or self.unavailable_for(spec):
                continue
            ident = _identity(spec)
            wanted[ident] = (spec, wanted.get(ident, (spec, 0))[1] + 1)
        with self._lock:
            if self._closed:
                return
            for ident, (spec, count) in wanted.items():
                waiting = self._spares[ident]
                while len(waiting) < count:
                    waiting.append(self._warmer.submit(self._clone, spec, spec))

    def _clone(self, spec: MachineSpec, backend_spec: MachineSpec) -> Machine:
        backend = self.backend(spec.backend)
        snapshot = self.template(spec)
        deadline = time.monotonic() + spec.timeout
        intent = self.ledger.intend("machine", backend.name, spec.name)
        try:
            ref = self._timed(
                "clone", spec, lambda: backend.clone(snapshot, backend_spec, self.session)
            )
        except BaseException:
            self.ledger.forget(intent)
            raise
        self.ledger.update(intent, id=ref.id)
        machine = Machine(backend, ref, spec, scratch=self.scratch)
        machine.intent = intent
        if spec.ready:
            try:
                self._timed("ready", spec, lambda: self._wait_ready(machine, deadline))
            except BaseException:
                self._destroy(machine)
                raise
        return machine

    def _wait_ready(self, machine: Machine, deadline: float) -> None:
        """Wait for ``ready=``; BootTimeout with the console tail if it does not hold.

        A probe whose command the guest does not have (exit 127, "not found") fails at once:
        waiting cannot make it appear.
        """
        ready = machine.spec.ready or ""
        left = max(deadline - time.monotonic(), 0.5)
        try:
            if ready.startswith("port:"):
                machine.wait_for_port(int(ready[5:]), timeout=left)
                return
            first = machine.run(ready, timeout=left)
            if first.exit_code == 0:
                return
            missing = missing_command(first.exit_code, first.stderr)
            if missing is None:
                machine.wait_until_succeeds(ready, timeout=max(deadline - time.monotonic(), 0.5))
                return
        except (CommandFailed, CommandTimeout) as exc:
            failed = exc if isinstance(exc, CommandFailed) else None
            missing = missing_command(failed.exit_code, failed.stderr) if failed else None
            why = f" within {machine.spec.timeout:g}s: {str(exc).splitlines()[0]}"
        if missing is not None:
            why = (
                f": {not_found(missing)}; install it in the image (or in a provision step), or "
                "change ready="
            )
        try:
            tail = "\n".join(machine.console_log().splitlines()[-30:])
        except VmenvError:
            tail = ""
        raise BootTimeout(f"machine {machine.name!r} was not ready (ready={ready!r}){why}", tail)

    def release(self, owner: str) -> None:
        """Release the machines of one scope owner (``"function:<nodeid>"`` ...)."""
        with self._lock:
            machines = list(self._scoped.pop(owner, {}).values())
        errors = []
        for machine in machines:
            try:
                self._release(machine)
            except Exception as exc:  # noqa: BLE001 - every machine gets its release
                errors.append(f"{machine.name} ({machine.ref.id}): {exc}")
        if errors:
            raise TeardownError("could not destroy:\n  " + "\n  ".join(errors))

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

    def close(self) -> list[str]:
        """Destroy every machine and (unless reused) every template; return the failures."""
        errors: list[str] = []
        with self._lock:
            self._closed = True
            spares = [f for waiting in self._spares.values() for f in waiting]
            self._spares.clear()
        self._warmer.shutdown(wait=True, cancel_futures=True)
        machines = [s.result() for s in spares if not s.cancelled() and s.exception() is None]
        for machine in machines:  # spares belong to no test: never kept
            try:
                self._destroy(machine)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"machine {machine.name} ({machine.ref.id}): {exc}")
        with self._lock:
            machines = [m for group in self._scoped.values() for m in group.values()]
            machines += list(self._pool.values()) + self._detached
            self._scoped.clear()
            self._pool.clear()
            self._detached = []
        for machine in machines:
            try:
                self._release(machine)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"machine {machine.name} ({machine.ref.id}): {exc}")
        self._executor.shutdown(wait=True, cancel_futures=True)
        errors += self._remove_templates()
        for name, backend in self._backends.items():
            summary = getattr(backend, "summary", None)  # optional: what it reports of itself
            if callable(summary):
                try:
                    self.notes += [str(line) for line in summary()]
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"backend {name}: summary: {exc}")
            close = getattr(backend, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"backend {name}: {exc}")
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._watchdog.goodbye()
        return errors

    def _remove_templates(self) -> list[str]:
        """Leave the ledger; the session's last process out removes its templates."""
        state = self.session.state_dir
        errors: list[str] = []
        with file_lock(state, f"session-{self.session.id}"):
            self.ledger.goodbye()
            if self.session.reuse or any(r.alive for r in owners(state, self.session.id)):
                return errors
            report = SweepReport()
            made = [b for b in self._backends.values() if not isinstance(b, BackendUnavailable)]
            close_session(made, state, self.session.id, report)
            errors += report.errors
        return errors

    # -- timings ----------------------------------------------------------------------------

    def _timed(self, phase: str, spec: MachineSpec, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            return fn()
        finally:
            self._record(phase, spec, time.monotonic() - start)

    def _record(self, phase: str, spec: MachineSpec, seconds: float) -> None:
        with self._lock:
            self.timings.append(Timing(phase, spec.backend, spec.name, seconds))

    def timing_summary(self) -> list[str]:
        """Lines for the terminal summary: per backend and phase, count, median and max."""
        return timing_lines(self.timings)
