"""Signals during a session with machines: an orderly teardown first, a hard exit second."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

__all__ = ["GracefulSignals"]


class GracefulSignals:
    """SIGTERM and SIGHUP tear down in order like Ctrl-C; a second signal exits at once.

    Installed only once machines exist (a suite without machines keeps pytest's own
    behaviour). After the hard exit the watchdog sweeps what is left.
    """

    def __init__(self) -> None:
        self.count = 0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.previous:
            return
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.count > 1:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"pytest-vmenv: {signal.Signals(signum).name}, tearing down")

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()
