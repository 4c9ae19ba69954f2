"""What the terminal summary says of a session, gathered from every process that ran tests.

Each process with an orchestrator condenses what it did into a :class:`Summary` at session
end: the backends' own notes, what it swept, the machines it kept, teardown failures and its
per-phase timings. Under pytest-xdist the workers run the tests but only the controller
writes the summary, so each worker sends its ``Summary`` home as plain data in
``config.workeroutput`` and the controller merges them (see ``pytest_testnodedown``).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["WORKEROUTPUT_KEY", "Summary", "Timing", "Timings", "timing_lines"]

_T = TypeVar("_T")

WORKEROUTPUT_KEY = "vmenv_summary"


@dataclass(frozen=True)
class Timing:
    """How long one phase (template, clone, ready, revert, teardown) of one machine took."""

    phase: str
    backend: str
    machine: str
    seconds: float


class Timings:
    """The phases timed in one process, appended to from any thread."""

    def __init__(self) -> None:
        self.timings: list[Timing] = []
        self._lock = threading.Lock()

    def record(self, phase: str, backend: str, machine: str, seconds: float) -> None:
        with self._lock:
            self.timings.append(Timing(phase, backend, machine, seconds))

    def timed(self, phase: str, backend: str, machine: str, fn: Callable[[], _T]) -> _T:
        """``fn()``, its duration recorded (also when it raises)."""
        start = time.monotonic()
        try:
            return fn()
        finally:
            self.record(phase, backend, machine, time.monotonic() - start)


def timing_lines(timings: Iterable[Timing]) -> list[str]:
    """Per backend and phase: count, median and max; then the three slowest machines."""
    timings = list(timings)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t in timings:
        groups[(t.backend, t.phase)].append(t.seconds)
    lines = []
    for (backend, phase), values in sorted(groups.items()):
        median = statistics.median(values)
        lines.append(
            f"{backend:<10} {phase:<9} n={len(values):<5} median={median:.3f}s "
            f"max={max(values):.3f}s"
        )
    slowest = sorted(timings, key=lambda t: t.seconds, reverse=True)[:3]
    if slowest:
        lines.append(
            "slowest machines: "
            + ", ".join(f"{t.machine} ({t.backend} {t.phase}) {t.seconds:.3f}s" for t in slowest)
        )
    return lines


def _unique(lines: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(lines))


@dataclass
class Summary:
    """The summary of one process, or (after :meth:`merge`) of a whole xdist session."""

    notes: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)

    def to_data(self) -> dict[str, Any]:
        """Plain lists and strings: what execnet can carry from a worker to the controller."""
        return {
            "notes": self.notes,
            "swept": self.swept,
            "kept": self.kept,
            "errors": self.errors,
            "timings": [[t.phase, t.backend, t.machine, t.seconds] for t in self.timings],
        }

    @classmethod
    def from_data(cls, data: Any) -> Summary:
        """The inverse of :meth:`to_data`; anything malformed is left out, never raised."""
        if not isinstance(data, dict):
            return cls()

        def strings(key: str) -> list[str]:
            value = data.get(key)
            return [str(v) for v in value] if isinstance(value, list) else []

        timings = []
        for row in data.get("timings") or ():
            if isinstance(row, list | tuple) and len(row) == 4:
                timings.append(Timing(str(row[0]), str(row[1]), str(row[2]), float(row[3])))
        return cls(
            notes=strings("notes"),
            swept=strings("swept"),
            kept=strings("kept"),
            errors=strings("errors"),
            timings=timings,
        )

    def merge(self, other: Summary) -> None:
        """Add another process's summary (notes each backend repeats per worker once)."""
        self.notes = _unique([*self.notes, *other.notes])
        self.swept = _unique([*self.swept, *other.swept])
        self.kept += other.kept
        self.errors += other.errors
        self.timings += other.timings

    def write(self, terminalreporter: Any, session_id: str) -> None:
        """The ``vmenv`` sections of the terminal summary (none if there is nothing to say)."""
        if self.errors:
            terminalreporter.write_sep("-", "vmenv: teardown failures", red=True)
            for line in self.errors:
                terminalreporter.write_line(line, red=True)
        if self.notes:
            terminalreporter.write_sep("-", "vmenv: backends")
            for line in self.notes:
                terminalreporter.write_line(line)
        if self.swept:
            terminalreporter.write_sep("-", "vmenv: swept what dead sessions left")
            for line in self.swept:
                terminalreporter.write_line(f"removed {line}")
        if self.kept:
            terminalreporter.write_sep("-", "vmenv: kept machines (remove with: vmenv gc --all)")
            for line in self.kept:
                terminalreporter.write_line(line)
        if self.timings:
            terminalreporter.write_sep("-", f"vmenv timings (session {session_id})")
            for line in timing_lines(self.timings):
                terminalreporter.write_line(line)
