"""Spares: machines cloned in the background for the next tests while the current one runs.

Only fresh, networkless, function-scoped clones are warmed: a network or a shared machine
belongs to its owner and cannot be made before the owner exists. A spare that died while it
waited is replaced by a fresh clone; one whose build or ``ready=`` failed raises that error.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import BootTimeout, ConfigError, ProvisionError
from .machine import Machine
from .spec import MachineSpec
from .templates import spec_identity

__all__ = ["WARM_AHEAD", "Spares"]

log = logging.getLogger("pytest_vmenv")

WARM_AHEAD = 2  # how many tests ahead machines are cloned while the current test runs


class Spares:
    """Spare machines by spec, made with ``clone`` and, when found dead, removed with
    ``destroy``; ``makeable(spec)`` says whether a spec's machine can be made here at all."""

    def __init__(
        self,
        clone: Callable[[MachineSpec], Machine],
        destroy: Callable[[Machine], None],
        makeable: Callable[[MachineSpec], bool],
    ) -> None:
        self._clone = clone
        self._destroy = destroy
        self._makeable = makeable
        self._waiting: dict[str, list[Future[Machine]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = False
        self._warmer = ThreadPoolExecutor(WARM_AHEAD, thread_name_prefix="vmenv-warm")

    def warm(self, specs: Sequence[MachineSpec]) -> None:
        """Clone spares of ``specs`` (the next tests' machines) in the background.

        ``specs`` may name one spec several times (the next ``WARM_AHEAD`` tests); spares are
        topped up to that count, so clones overlap the tests before them.
        """
        wanted: dict[str, tuple[MachineSpec, int]] = {}
        for spec in specs:
            if spec.scope != "function" or spec.isolation != "clone" or spec.network:
                continue
            if not self._makeable(spec):
                continue
            ident = spec_identity(spec)
            wanted[ident] = (spec, wanted.get(ident, (spec, 0))[1] + 1)
        with self._lock:
            if self._closed:
                return
            for ident, (spec, count) in wanted.items():
                waiting = self._waiting[ident]
                while len(waiting) < count:
                    waiting.append(self._warmer.submit(self._clone, spec))

    def take(self, spec: MachineSpec) -> Machine | None:
        """A spare of ``spec`` that still answers, or None (then clone one)."""
        with self._lock:
            waiting = self._waiting.get(spec_identity(spec))
            spare = waiting.pop(0) if waiting else None
        return None if spare is None else self._check(spare)

    def _check(self, spare: Future[Machine]) -> Machine | None:
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

    def close(self) -> list[Machine]:
        """Stop warming; the spares that were made (for the caller to destroy)."""
        with self._lock:
            self._closed = True
            futures = [f for waiting in self._waiting.values() for f in waiting]
            self._waiting.clear()
        self._warmer.shutdown(wait=True, cancel_futures=True)
        return [f.result() for f in futures if not f.cancelled() and f.exception() is None]
