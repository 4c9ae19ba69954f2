"""poll_until: backs off, never sleeps past the deadline, and says what it waited for."""

from __future__ import annotations

import itertools
import time

import pytest

from pytest_vmenv import errors
from pytest_vmenv.poll import poll_until


def test_returns_the_first_answer_and_passes_last_try_false_until_then() -> None:
    calls: list[bool] = []

    def probe(last_try: bool) -> str | None:
        calls.append(last_try)
        return "up" if len(calls) == 3 else None

    assert poll_until(probe, timeout=5, what="x", interval=0.001) == "up"
    assert calls == [False, False, False]


def test_last_try_after_the_deadline_can_answer() -> None:
    calls: list[bool] = []

    def probe(last_try: bool) -> str | None:
        calls.append(last_try)
        return "late" if last_try else None

    assert poll_until(probe, timeout=0.05, what="x", interval=0.01) == "late"
    assert calls[-1] is True and calls.count(True) == 1


def test_timeout_names_what_and_the_last_retried_exception() -> None:
    def probe(last_try: bool) -> None:
        raise ConnectionRefusedError("refused")

    start = time.monotonic()
    with pytest.raises(errors.BootTimeout, match=r"port 22 of 'vm': not after 0.2s .*refused"):
        poll_until(
            probe,
            timeout=0.2,
            what="port 22 of 'vm'",
            retry_on=(OSError,),
            error=errors.BootTimeout,
        )
    assert time.monotonic() - start < 1.0


def test_an_exception_not_retried_propagates_at_once() -> None:
    calls: list[bool] = []

    def probe(last_try: bool) -> None:
        calls.append(last_try)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        poll_until(probe, timeout=5, what="x", retry_on=(OSError,))
    assert calls == [False]


def test_the_last_try_may_raise_its_own_error() -> None:
    def probe(last_try: bool) -> None:
        if last_try:
            raise errors.BootTimeout("never up", console_tail="kernel panic")
        return None

    with pytest.raises(errors.BootTimeout, match="kernel panic"):
        poll_until(probe, timeout=0.05, what="x", interval=0.01)


def test_pauses_grow_but_stay_under_max_interval() -> None:
    stamps: list[float] = []

    def probe(last_try: bool) -> None:
        stamps.append(time.monotonic())

    with pytest.raises(TimeoutError):
        poll_until(probe, timeout=0.5, what="x", interval=0.01, max_interval=0.08)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps[0] < gaps[3]
    assert max(gaps) < 0.08 + 0.05


def test_thousands_of_tries_do_not_overflow_the_back_off() -> None:
    calls: list[bool] = []

    def probe(last_try: bool) -> str | None:
        calls.append(last_try)
        return "done" if len(calls) == 3000 else None

    result = poll_until(probe, timeout=30, what="x", interval=1e-7, max_interval=1e-7)
    assert result == "done" and len(calls) == 3000


def test_the_last_try_is_the_one_no_pause_fits_after_so_the_deadline_holds() -> None:
    calls: list[bool] = []

    def probe(last_try: bool) -> None:
        calls.append(last_try)
        time.sleep(0.2)

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        poll_until(probe, timeout=0.5, what="x", interval=0.05)
    assert time.monotonic() - start < 0.5 + 0.2 + 0.1  # at most one probe past the deadline
    assert calls[-1] is True and calls.count(True) == 1


def test_a_retry_on_of_exception_still_ends_at_the_deadline() -> None:
    with pytest.raises(TimeoutError, match="last: OSError: nope"):
        poll_until(
            lambda _last: (_ for _ in ()).throw(OSError("nope")),
            timeout=0.1,
            what="x",
            interval=0.01,
            retry_on=(Exception,),
        )
