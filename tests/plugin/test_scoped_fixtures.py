"""module_vm / session_vm: fixtures of a wider scope reach the machines of that scope's marks."""

from __future__ import annotations

import json
import os

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator's host image needs root")

# The fixture and every test write what machine they had into $LOG (one JSON line each).
CONFTEST = """
import json, os, pytest

def log(**record):
    with open(os.environ["LOG"], "a") as fh:
        fh.write(json.dumps(record) + "\\n")

@pytest.fixture(scope="{scope}")
def service({fixture}, request):
    vm = {fixture}
    vm.succeed("echo started >> /run/starts")
    vm.succeed("(nohup python3 -m http.server 8000 >/dev/null 2>&1 & echo $! > /run/web.pid)")
    vm.wait_for_port(8000, timeout=10)
    log(who="fixture", where=request.node.nodeid, id=vm.ref.id)
    yield vm
    vm.succeed("kill $(cat /run/web.pid)")  # the machine is still there at fixture teardown

@pytest.fixture
def check(service, vm, request):
    assert vm is service
    assert vm.read_text("/run/starts") == "started\\n"
    assert 8000 in vm.listening_ports()
    log(who="test", where=request.node.nodeid, id=vm.ref.id)
"""

TESTS = """
import pytest
pytestmark = pytest.mark.vm(image="host", scope="{scope}")

def test_one(check):
    pass

class TestInClass:
    def test_two(self, check):
        pass
"""


def _run(pytester: pytest.Pytester, scope: str, fixture: str) -> list[dict[str, str]]:
    log = pytester.path / "log.jsonl"
    pytester.makeconftest(CONFTEST.format(scope=scope, fixture=fixture))
    source = TESTS.format(scope=scope)
    pytester.makepyfile(test_first=source, test_second=source)
    os.environ["LOG"] = str(log)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    finally:
        del os.environ["LOG"]
    result.assert_outcomes(passed=4)
    return [json.loads(line) for line in log.read_text().splitlines()]


def _live_guest_ids() -> set[str]:
    from pytest_vmenv.paths import state_dir

    guests = state_dir() / "emulator" / "guests"
    return {p.name for p in guests.iterdir()} if guests.exists() else set()


def test_module_fixture_starts_a_service_once_in_the_modules_machine(
    pytester: pytest.Pytester,
) -> None:
    records = _run(pytester, "module", "module_vm")
    fixtures = [r for r in records if r["who"] == "fixture"]
    tests = [r for r in records if r["who"] == "test"]
    assert [f["where"] for f in fixtures] == ["test_first.py", "test_second.py"], records
    for fixture in fixtures:  # each module's tests ran in the machine its fixture set up
        mine = [t["id"] for t in tests if t["where"].startswith(fixture["where"] + "::")]
        assert mine == [fixture["id"], fixture["id"]], records
    ids = {f["id"] for f in fixtures}
    assert len(ids) == 2 and not ids & _live_guest_ids()


def test_session_fixture_reaches_the_session_machine(pytester: pytest.Pytester) -> None:
    records = _run(pytester, "session", "session_vm")
    assert [r["who"] for r in records].count("fixture") == 1, records
    ids = {r["id"] for r in records}
    assert len(ids) == 1 and not ids & _live_guest_ids(), records


def test_scope_without_such_machines_is_a_clear_error(pytester: pytest.Pytester) -> None:
    before = _live_guest_ids()
    pytester.makepyfile(
        test_function_only="""
        import pytest
        @pytest.fixture(scope="module")
        def service(module_vm):
            return module_vm
        @pytest.mark.vm(image="host")
        def test_a(service):
            pass
        """,
        test_two_machines="""
        import pytest
        pytestmark = [pytest.mark.vm(image="host", name="web", scope="module"),
                      pytest.mark.vm(image="host", name="db", scope="module")]
        @pytest.fixture(scope="module")
        def service(module_vm):
            return module_vm
        def test_b(service):
            pass
        def test_c(module_vms, vms):
            assert sorted(module_vms) == ["db", "web"]
            assert module_vms["db"] is vms["db"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines_random(
        [
            "*module_vms: module test_function_only.py has no machine with scope='module'; "
            "its tests' machines: vm (scope='function', test_function_only.py::test_a). "
            'Declare one with @pytest.mark.vm(..., scope="module"), or use the fixtures vm / '
            "vms in a function-scoped fixture",
            "*module_vm: module test_two_machines.py has 2 machines with scope='module' "
            "(db, web); use module_vms?'NAME'?",
        ]
    )
    assert "pytest_vmenv/" not in result.stdout.str()
    assert _live_guest_ids() <= before
