"""How the plugin's own failures read in a pytest report: the message, not its internals.

A provision step that exits 100 is the image's or the spec's problem; the 60 frames of
orchestrator, thread pool and backend code it passed through are the plugin's business. So,
unless ``--vm-debug`` (``vmenv_debug``, ``VMENV_DEBUG``), ``-vv`` or pytest's
``--full-trace`` asks for them:

* a :class:`~pytest_vmenv.errors.VmenvError` out of a fixture's setup (``vm``, ``vms``,
  ``vm_factory``) becomes ``pytest.fail(..., pytrace=False)``: the report is the error's
  class and message (the step, its output, the console tail: whatever the error carries)
  and one line saying how to see more;
* an error a test gets from a :class:`~pytest_vmenv.machine.Machine` verb or from
  ``vm_factory.create`` keeps its type (tests catch it), but its traceback is cut to the
  test's own frame: :func:`hide` is the ``__tracebackhide__`` of the plugin's frames, and
  :func:`trimmed` drops the frames (and the chained cause) below the verb.

The switch is process-wide (:func:`configure`, called from ``pytest_configure``; undone by
:func:`unconfigure`, which restores the enclosing run's setting: a ``pytester`` run inside a
run is a nested pair): a ``__tracebackhide__`` callable is only given the exception, not the
config. Outside a pytest run nothing is cut.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from .errors import VmenvError

__all__ = ["clean_setup", "configure", "debug", "hide", "trimmed", "unconfigure"]

_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)
_state = {"debug": True}  # outside a configured pytest run (a script): nothing is cut
_outer: list[bool] = []  # the settings of the enclosing runs
HOW_TO_SEE_MORE = "(pytest-vmenv: --vm-debug or -vv shows the plugin's traceback)"


def configure(config: pytest.Config, option: bool) -> None:
    """Show the plugin's frames if ``option`` (``--vm-debug``), ``-vv`` or ``--full-trace``."""
    verbose = config.getoption("verbose", 0) or 0
    _outer.append(_state["debug"])
    _state["debug"] = bool(option or verbose >= 2 or config.getoption("fulltrace", False))


def unconfigure() -> None:
    """Back to the enclosing run's setting (nothing cut outside any run)."""
    _state["debug"] = _outer.pop() if _outer else True


def debug() -> bool:
    """Whether reports show the plugin's own frames."""
    return _state["debug"]


def hide(excinfo: Any = None) -> bool:
    """``__tracebackhide__`` for the plugin's frames: hidden unless debugging."""
    return not _state["debug"]


def trimmed(exc: _E) -> _E:
    """``exc`` without the frames it went through and without its chained cause.

    ``raise trimmed(exc)`` in a verb then shows the caller's frame and the message only.
    With debugging on, ``exc`` is returned untouched.
    """
    if _state["debug"]:
        return exc
    exc.__cause__ = None
    exc.__suppress_context__ = True
    return exc.with_traceback(None)


def clean_setup(make: Callable[[], _T]) -> _T:
    """Call ``make`` (a fixture's work); a VmenvError fails the setup with its message only."""
    __tracebackhide__ = hide
    try:
        return make()
    except VmenvError as exc:
        if _state["debug"]:
            raise
        message = f"{type(exc).__name__}: {exc}\n{HOW_TO_SEE_MORE}"
    pytest.fail(message, pytrace=False)
