"""errors.Boundary: one table maps foreign exceptions; our own bugs stay bugs."""

from __future__ import annotations

import pytest

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef


class Foreign(Exception):
    pass


def _gone_if_missing(exc: BaseException, call: errors.Call) -> errors.VmenvError | None:
    if "missing" in str(exc) and call.ref is not None:
        return errors.MachineGone(f"{call.backend}: {call.machine} is gone")
    return None


BOUNDARY = errors.Boundary(
    "fake",
    [
        (Foreign, _gone_if_missing),
        ((Foreign, OSError), errors.failed(hint="; is the daemon running?")),
    ],
)
REF = MachineRef("fake", "id-1", "web", "s1")


class Api:
    @BOUNDARY
    def destroy(self, ref: MachineRef, exc: BaseException) -> None:
        raise exc


def test_first_matching_rule_that_answers_wins() -> None:
    with pytest.raises(errors.MachineGone, match=r"fake: machine 'web' \(id-1\) is gone"):
        Api().destroy(REF, Foreign("missing"))
    with pytest.raises(errors.BackendError, match="fake: destroy failed: boom; is the daemon"):
        Api().destroy(REF, Foreign("boom"))


def test_os_errors_are_chained_from_the_original() -> None:
    with pytest.raises(errors.BackendError) as info:
        Api().destroy(REF, FileNotFoundError(2, "no such file"))
    assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize("bug", [ValueError("v"), KeyError("k"), TypeError("t")])
def test_our_own_bugs_pass_unchanged(bug: Exception) -> None:
    with pytest.raises(type(bug)) as info:
        Api().destroy(REF, bug)
    assert info.value is bug


def test_our_own_errors_pass_unchanged() -> None:
    err = errors.CommandTimeout("web", "sleep 9", 1.0)
    with pytest.raises(errors.CommandTimeout) as info:
        Api().destroy(REF, err)
    assert info.value is err


def test_guard_names_the_operation_and_can_hide_the_cause() -> None:
    quiet = errors.Boundary("fake", [(Foreign, errors.failed())], hide_cause=True)
    with (
        pytest.raises(errors.BackendError, match="fake: login failed: x") as info,
        quiet.guard("login"),
    ):
        raise Foreign("x")
    assert info.value.__cause__ is None and info.value.__suppress_context__
