"""Image builds shown in pytest's terminal while they run (see :mod:`.images.progress`).

Interactive (the terminal reporter writes to a terminal): one status line, rewritten as the
build moves on (what is built, elapsed time, mmdebstrap's current step), then a line with
the result. Otherwise (CI, a pipe, an xdist worker): a line at every step and at least every
:data:`~pytest_vmenv.images.progress.HEARTBEAT` seconds. xdist workers write to their
stderr, which is the controller's.

Builds run on the orchestrator's threads, and pytest's output capture is not thread-safe, so
events from other threads are queued and shown by :meth:`TerminalProgress.pump` on the main
thread, which the orchestrator calls while a test waits for a template (and once after).
Output is written with capturing suspended, as pytest's live logging does.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from .images import BuildEvent, LinePrinter, subscribe

__all__ = ["TerminalProgress"]


class TerminalProgress:
    """Subscribed to image builds from construction until :meth:`close`."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._worker = hasattr(config, "workerinput")
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        self._reporter: Any = None if self._worker else reporter
        interactive = self._reporter is not None and bool(getattr(reporter, "isatty", False))
        self._printer = LinePrinter(self._line, self._status if interactive else None)
        self._status_on = False
        self._queue: deque[BuildEvent] = deque(maxlen=500)
        self._lock = threading.Lock()
        self._unsubscribe = subscribe(self._event)

    def close(self) -> None:
        self._unsubscribe()
        self.pump()

    def _event(self, event: BuildEvent) -> None:
        with self._lock:
            if event.tick and self._queue and self._queue[-1].tick:
                self._queue[-1] = event  # only the latest tick matters
            else:
                self._queue.append(event)
        if threading.current_thread() is threading.main_thread():
            self.pump()

    def pump(self) -> None:
        """Show what was queued (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        if not events:
            return
        with self._uncaptured():
            for event in events:
                self._printer(event)

    @contextlib.contextmanager
    def _uncaptured(self) -> Iterator[None]:
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        if capman is None:
            yield
            return
        with capman.global_and_fixture_disabled():
            yield

    def _line(self, text: str) -> None:
        if self._reporter is None:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            return
        if self._status_on:
            self._reporter.rewrite(text, erase=True)
            self._reporter.write("\n")
            self._status_on = False
            return
        self._reporter.write_line(text)

    def _status(self, event: BuildEvent) -> None:
        if not self._status_on:
            self._reporter.ensure_newline()
            self._status_on = True
        width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be rewritten
        self._reporter.rewrite(event.status(width), erase=True)
