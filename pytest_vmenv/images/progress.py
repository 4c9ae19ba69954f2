"""Progress of image builds: events published to whoever shows them.

An image build takes tens of seconds (a minbase with nginx: about 50 s), so it is never
silent. The builder publishes a :class:`BuildEvent` when it starts, at every step
``mmdebstrap`` announces (``I: downloading packages with apt...``), once a second while a
step runs (a *tick*), and when it ends. Subscribers (the pytest plugin's terminal printer,
the ``vmenv images build`` stderr printer) decide what to show; every event that is not a
tick is also logged on the ``pytest_vmenv.images`` logger at INFO.

Subscribers are called on the building thread: they must be quick and thread-safe.
:class:`LinePrinter` is the shared renderer: a status line rewritten in place on a
terminal, else a line at each new step and at least every :data:`HEARTBEAT` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HEARTBEAT", "BuildEvent", "LinePrinter", "publish", "subscribe"]

log = logging.getLogger("pytest_vmenv.images")

HEARTBEAT = 10.0
"""Seconds between two lines without a new step, when the output is not a terminal."""

_subscribers: list[Callable[[BuildEvent], None]] = []
_lock = threading.Lock()


@dataclass(frozen=True)
class BuildEvent:
    """Where one image build is.

    ``state``: ``waiting`` (another process builds it; we wait for its lock), ``building``,
    ``built`` or ``failed``. ``step`` is mmdebstrap's current step ("extracting archives").
    ``tick`` is True for the once-a-second events that only move ``elapsed`` on.
    """

    image: str
    key: str
    state: str
    step: str
    elapsed: float
    tick: bool = False

    @property
    def final(self) -> bool:
        return self.state in ("built", "failed")

    def text(self) -> str:
        what = {
            "waiting": "waiting for image",
            "building": "building image",
            "built": "built image",
            "failed": "failed to build image",
        }.get(self.state, self.state)
        return f"vmenv: {what} {self.image} [{self.key[:12]}] {self.elapsed:.0f}s: {self.step}"

    def status(self, width: int) -> str:
        """The event as a status line of at most ``width`` characters: the image's name is
        shortened first, so that the elapsed time and the step stay readable."""
        what = "waiting for" if self.state == "waiting" else "building"
        tail = f" {self.elapsed:.0f}s: {self.step}"
        room = max(12, width - len(f"vmenv: {what} ") - len(tail))
        image = self.image if len(self.image) <= room else self.image[: room - 3] + "..."
        return f"vmenv: {what} {image}{tail}"[:width]


def subscribe(callback: Callable[[BuildEvent], None]) -> Callable[[], None]:
    """Call ``callback`` with every event from now on; returns the unsubscribe function."""
    with _lock:
        _subscribers.append(callback)

    def unsubscribe() -> None:
        with _lock:
            if callback in _subscribers:
                _subscribers.remove(callback)

    return unsubscribe


def publish(event: BuildEvent) -> None:
    """Hand ``event`` to every subscriber (a failing one never breaks the build)."""
    if not event.tick:
        log.info("%s", event.text())
    with _lock:
        callbacks = list(_subscribers)
    for callback in callbacks:
        try:
            callback(event)
        except Exception:  # showing progress must never fail a build
            log.debug("progress subscriber %r failed", callback, exc_info=True)


class LinePrinter:
    """Turns events into output: ``status(event)`` rewrites a status line (a terminal; see
    :meth:`BuildEvent.status`), ``line(text)`` writes a whole line (the result, on a terminal).
    With ``status`` None, lines are written at every new step or state and at least every
    :data:`HEARTBEAT` seconds (a log, a CI job)."""

    def __init__(
        self,
        line: Callable[[str], None],
        status: Callable[[BuildEvent], None] | None = None,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self._line = line
        self._status = status
        self._heartbeat = heartbeat
        self._last: dict[str, tuple[str, str, float]] = {}  # key -> (state, step, when)

    def __call__(self, event: BuildEvent) -> None:
        now = time.monotonic()
        state, step, when = self._last.get(event.key, ("", "", 0.0))
        if event.final:
            self._last.pop(event.key, None)
            self._line(event.text())
            return
        if self._status is not None:
            self._status(event)
            self._last[event.key] = (event.state, event.step, now)
            return
        if (event.state, event.step) != (state, step) or now - when >= self._heartbeat:
            self._line(event.text())
            self._last[event.key] = (event.state, event.step, now)
