"""The backends of one session: each made and checked once, swept when first used, and
asked once per distinct spec whether it can make that spec's machine here.

What a backend cannot do (its :class:`~pytest_vmenv.backend.Capabilities`) is acted on here
and by the orchestrator: ``network=`` on a backend without private networks gets one
:class:`CapabilityWarning`, a machine without a console log gets no console tail.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

from .backend import Backend, Capabilities, Configured, Session, SpecCheck
from .errors import BackendUnavailable
from .ledger import Ledger, file_lock
from .reaper import sweep
from .spec import MachineSpec
from .templates import spec_identity

__all__ = ["CapabilityWarning", "SessionBackends"]

log = logging.getLogger("pytest_vmenv")


class CapabilityWarning(UserWarning):
    """A machine asks for what its backend does not do fully here (see ``capabilities()``)."""


class SessionBackends:
    """Backends by name, made with ``make_backend``; ``swept`` lists what their first sweep
    removed of dead sessions' leftovers."""

    def __init__(
        self, session: Session, ledger: Ledger, make_backend: Callable[[str], Backend]
    ) -> None:
        self.session = session
        self.ledger = ledger
        self.swept: list[str] = []
        self._make_backend = make_backend
        self._backends: dict[str, Backend | BackendUnavailable] = {}
        self._capabilities: dict[str, Capabilities] = {}
        self._warned: set[tuple[str, str]] = set()
        self._refusals: dict[str, str | None] = {}
        self._lock = threading.RLock()

    def made(self) -> dict[str, Backend]:
        """Every backend made so far (that can run here), by the name it was asked for."""
        with self._lock:
            return {
                name: b
                for name, b in self._backends.items()
                if not isinstance(b, BackendUnavailable)
            }

    def get(self, name: str) -> Backend:
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
                    self._capabilities[name] = self._capabilities[found.name]
                self._backends[name] = found
        if isinstance(found, BackendUnavailable):
            raise found
        return found

    def _adopt(self, backend: Backend) -> None:
        """Record a new backend in the ledger, then sweep what dead sessions left on it."""
        self.ledger.add_backend(
            backend.name, backend.options if isinstance(backend, Configured) else {}
        )
        self._capabilities[backend.name] = backend.capabilities()
        with file_lock(self.session.state_dir, "sweep"):
            report = sweep([backend], self.session.state_dir)
        self.swept += report.removed
        for error in report.errors:
            log.warning("pytest-vmenv: sweep: %s", error)

    def capabilities(self, name: str) -> Capabilities:
        """What the backend ``name`` (as a spec names it, or its own ``name``) can do; all
        False while it is not made, or cannot be."""
        return self._capabilities.get(name, Capabilities())

    def unavailable(self, name: str) -> str | None:
        """Why backend ``name`` cannot run here, or None if it can."""
        try:
            self.get(name)
        except BackendUnavailable as exc:
            return exc.reason
        return None

    def unavailable_for(self, spec: MachineSpec) -> str | None:
        """Why this backend, running here, cannot make ``spec``'s machine, or None if it can.

        Asked of the backend (:class:`~pytest_vmenv.backend.SpecCheck`) once per distinct
        spec, not per template: two tests that share a template but not ``network=`` get each
        its own answer. None too when the backend itself cannot run (see :meth:`unavailable`).
        """
        ident = spec_identity(spec)
        with self._lock:
            if ident in self._refusals:
                return self._refusals[ident]
        try:
            backend = self.get(spec.backend)
        except BackendUnavailable:
            return None
        reason = backend.unavailable_for(spec) if isinstance(backend, SpecCheck) else None
        if reason is None and spec.outbound and not self.capabilities(spec.backend).outbound:
            reason = (
                f"outbound=True: the {spec.backend} backend gives machines no outbound network "
                "yet (a machine has no route out); provision from an image that has what it "
                "needs, or copy files in with vm.put"
            )
        with self._lock:
            self._refusals[ident] = reason
        return reason

    def warn_fallbacks(self, spec: MachineSpec) -> None:
        """Warn (a :class:`CapabilityWarning`, in the report of the test that makes the
        machine), once per backend and kind, of what ``spec`` asks that its backend does not
        honour fully here; the machine is made all the same. Limits are the backend's to warn
        of: whether they hold can depend on the host (the emulator's delegated cgroups)."""
        caps = self.capabilities(spec.backend)
        if spec.network is not None and not caps.network:
            self._warn_once(
                spec.backend,
                "network",
                f"network={spec.network!r} is not a private network per environment on the "
                f"{spec.backend} backend: machines of other tests may share it",
            )

    def _warn_once(self, backend: str, kind: str, message: str) -> None:
        with self._lock:
            if (backend, kind) in self._warned:
                return
            self._warned.add((backend, kind))
        warnings.warn(CapabilityWarning(message), stacklevel=2)
