"""``poll_until``: every wait in the project, on tenacity.

A wait asks the same question again with growing pauses until it has an answer or the time is
up. Written once here, so that every wait backs off the same way, never sleeps past its
deadline, and says on its last try what it waited for (the NixOS test driver's
``retry(fn(last_try))``): the probe is called with ``last_try=True`` once the time has passed,
so it can raise an error that carries what it saw (a console tail, the last exit status)
instead of a bare "timed out".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
)

__all__ = ["poll_until"]

_T = TypeVar("_T")


def poll_until(
    probe: Callable[[bool], _T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    max_interval: float = 1.0,
    retry_on: tuple[type[BaseException], ...] = (),
    error: Callable[[str], BaseException] = TimeoutError,
) -> _T:
    """Call ``probe(False)`` until it returns something other than None, and return that.

    Pauses start at ``interval`` seconds and double up to ``max_interval``, and never run past
    the deadline. An exception of ``retry_on`` counts as "not yet"; any other propagates at
    once. When ``timeout`` seconds have passed, ``probe(True)`` runs one last time: its value
    is returned, an exception other than ``retry_on`` propagates (a probe raises its own,
    better worded error there), and a None or a ``retry_on`` exception raises
    ``error(message)``, naming what was waited for, for how long, and the last exception.
    """
    deadline = time.monotonic() + timeout

    def pause(state: RetryCallState) -> float:
        step = min(max_interval, interval * 2.0 ** (state.attempt_number - 1))
        return max(0.0, min(step, deadline - time.monotonic()))

    retrying = Retrying(
        stop=stop_after_delay(timeout),
        wait=pause,
        retry=retry_if_result(lambda value: value is None) | retry_if_exception_type(retry_on),
    )
    last: BaseException | None = None
    try:
        value = retrying(probe, False)
    except RetryError as exc:
        last = exc.last_attempt.exception()
    else:
        if value is not None:
            return value
    try:
        value = probe(True)
    except retry_on as exc:
        last = exc
        value = None
    if value is not None:
        return value
    message = f"{what}: not after {timeout:g}s"
    if last is not None:
        message += f" (last: {type(last).__name__}: {last})"
    raise error(message)
