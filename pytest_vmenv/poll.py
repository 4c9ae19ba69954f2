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
    Retrying,
    retry_if_exception_type,
    retry_if_result,
)

__all__ = ["poll_until"]

_T = TypeVar("_T")


class _Last(BaseException):  # not an Exception: no retry_on can catch it
    """The last try found nothing: ends the retrying with what it saw (``cause``)."""

    def __init__(self, cause: BaseException | None) -> None:
        self.cause = cause


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
    """Call ``probe(last_try)`` until it returns something other than None, and return that.

    Pauses start at ``interval`` seconds and double up to ``max_interval``, and never run past
    the deadline. An exception of ``retry_on`` counts as "not yet"; any other propagates at
    once. The try after which no pause fits before ``timeout`` runs out is the last one, and
    gets ``last_try=True``: its value is returned, an exception other than ``retry_on``
    propagates (a probe raises its own, better worded error there), and a None or a
    ``retry_on`` exception raises ``error(message)``, naming what was waited for, for how
    long, and the last exception. A wait never overruns its deadline by more than one probe.
    """
    deadline = time.monotonic() + timeout
    tries = 0

    def pause_after(attempt: int) -> float:
        return min(max_interval, interval * 2.0 ** min(attempt - 1, 64))

    def attempt() -> _T | None:
        nonlocal tries
        tries += 1
        last_try = time.monotonic() + pause_after(tries) >= deadline
        try:
            value = probe(last_try)
        except retry_on as exc:
            if last_try:
                raise _Last(exc) from exc
            raise
        if value is None and last_try:
            raise _Last(None)
        return value

    def pause(state: RetryCallState) -> float:
        return max(0.0, min(pause_after(state.attempt_number), deadline - time.monotonic()))

    retrying = Retrying(
        wait=pause,
        retry=retry_if_result(lambda value: value is None) | retry_if_exception_type(retry_on),
    )
    try:
        value = retrying(attempt)
    except _Last as last:
        message = f"{what}: not after {timeout:g}s"
        if last.cause is not None:
            message += f" (last: {type(last.cause).__name__}: {last.cause})"
        raise error(message) from None
    assert value is not None  # retrying returns only an answer
    return value
