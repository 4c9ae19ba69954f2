"""An elastic pool of daemon threads for work that blocks for long (a relayed connection).

Starting a thread costs a fifth of a millisecond on a busy host, a good part of a small
request's round trip, so a thread that finished its job waits :data:`IDLE` seconds for the
next one before it exits. There is no bound: every job gets a thread at once (a relay that
waited for a free thread could stall a connection forever), which is what a thread per
connection would give too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

__all__ = ["IDLE", "Workers"]

IDLE = 10.0
"""Seconds an idle worker waits for a job before it exits."""

_Job = Callable[[], None]


class Workers:
    """``run(job)`` runs ``job()`` on an idle worker, or on a new daemon thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._idle = 0
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()

    def run(self, job: _Job) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1  # that worker is promised this job
                self._jobs.put(job)
                return
        threading.Thread(target=self._work, args=(job,), name=self.name, daemon=True).start()

    def _work(self, job: _Job | None) -> None:
        while job is not None:
            job()  # a job handles its own errors
            with self._lock:
                self._idle += 1
            job = self._next()

    def _next(self) -> _Job | None:
        try:
            return self._jobs.get(timeout=IDLE)
        except queue.Empty:
            pass
        with self._lock:  # a run() in between promised a job to an idle worker: maybe us
            try:
                return self._jobs.get_nowait()
            except queue.Empty:
                self._idle -= 1
                return None
