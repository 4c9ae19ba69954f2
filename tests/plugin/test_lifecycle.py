"""The plugin end to end on the real emulator, driven through pytester subprocesses."""

from __future__ import annotations

import json
import os

import pytest

pytest_plugins = ["pytester"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator's host image needs root")
pytestmark = needs_root

# Each inner test records the ids of its machines, so the outer test can prove they are gone.
CONFTEST = """
import json, os, pytest

@pytest.fixture(autouse=True)
def _record(request):
    yield
    machines = request.node.stash.get(__import__("pytest_vmenv.plugin").plugin.machines_key, {})
    with open(os.environ["VMENV_TEST_LOG"], "a") as fh:
        for m in machines.values():
            record = {"test": request.node.name, "name": m.name, "id": m.ref.id}
            fh.write(json.dumps(record) + "\\n")
"""


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    log = pytester.path / "machines.log"
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(source)
    os.environ["VMENV_TEST_LOG"] = str(log)
    try:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    finally:
        del os.environ["VMENV_TEST_LOG"]


def _records(pytester: pytest.Pytester) -> list[dict[str, str]]:
    log = pytester.path / "machines.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _live_guest_ids() -> set[str]:
    from pytest_vmenv.paths import state_dir

    guests = state_dir() / "emulator" / "guests"
    return {p.name for p in guests.iterdir()} if guests.exists() else set()


def test_function_scope_fresh_clone_and_gone_after(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host")
        def test_a(vm):
            vm.succeed("touch /var/tmp/leftover")
        @pytest.mark.vm(image="host")
        def test_b(vm):
            vm.fail("test -e /var/tmp/leftover")
        def test_c():
            # test_a's and test_b's machines are gone as soon as their tests end
            import json, os
            from pytest_vmenv.paths import state_dir
            ids = [json.loads(l)["id"] for l in open(os.environ["VMENV_TEST_LOG"])]
            assert len(ids) == 2
            for guest_id in ids:
                assert not (state_dir() / "emulator" / "guests" / guest_id).exists()
        """,
    )
    result.assert_outcomes(passed=3)
    records = _records(pytester)
    assert len({r["id"] for r in records}) == 2
    assert not {r["id"] for r in records} & _live_guest_ids()


def test_module_and_session_scope_share(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host", scope="module")
        def test_a(vm):
            vm.succeed("touch /var/tmp/shared")
        @pytest.mark.vm(image="host", scope="module")
        def test_b(vm):
            vm.succeed("test -e /var/tmp/shared")
        """,
    )
    result.assert_outcomes(passed=2)
    ids = {r["id"] for r in _records(pytester)}
    assert len(ids) == 1 and not ids & _live_guest_ids()


def test_revert_isolation_reuses_one_machine(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host", isolation="revert")
        @pytest.mark.parametrize("n", range(3))
        def test_r(vm, n):
            vm.fail("test -e /var/tmp/marker")
            vm.succeed("touch /var/tmp/marker")
        """,
    )
    result.assert_outcomes(passed=3)
    ids = {r["id"] for r in _records(pytester)}
    assert len(ids) == 1 and not ids & _live_guest_ids()


def test_closest_level_defines_machines(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        pytestmark = pytest.mark.vm(image="host", name="moddefault")
        def test_module_default(vms):
            assert list(vms) == ["moddefault"]
        @pytest.mark.vm(image="host", name="own")
        def test_own(vms):
            assert list(vms) == ["own"]
        class TestClass:
            pytestmark = [pytest.mark.vm(image="host", name="a"),
                          pytest.mark.vm(image="host", name="b")]
            def test_class_level(self, vms):
                assert sorted(vms) == ["a", "b"]
        """,
    )
    result.assert_outcomes(passed=3)


def test_failure_report_has_commands_and_teardown_still_runs(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host", name="box")
        def test_fails(vm):
            vm.run("echo first-command")
            vm.succeed("echo out; exit 5")
        """,
        "--junitxml=report.xml",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*CommandFailed: command on 'box' exited with 5, expected exit status 0: echo out; exit 5",
        "*vmenv box: commands*",
        "$ echo first-command  -> exit 0 (*",
    ])  # fmt: skip
    assert "first-command" in (pytester.path / "report.xml").read_text()
    assert not {r["id"] for r in _records(pytester)} & _live_guest_ids()


def test_setup_error_releases_other_machines(pytester: pytest.Pytester) -> None:
    before = _live_guest_ids()
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host", name="ok")
        @pytest.mark.vm(image="host", name="bad", provision=["echo provision-broke >&2; exit 3"])
        def test_x(vms):
            pass
        """,
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ProvisionError*", "*provision-broke*"])
    assert _live_guest_ids() - before == set()


def test_vm_factory(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        def test_factory(vm_factory):
            a = vm_factory.create(image="host", name="a", memory="128M")
            b = vm_factory.create(name="b")
            a.succeed("touch /var/tmp/only-a")
            b.fail("test -e /var/tmp/only-a")
        """,
    )
    result.assert_outcomes(passed=1)


def test_vm_factory_destroy_goes_through_the_ledger(pytester: pytest.Pytester) -> None:
    """A machine destroyed by hand is gone at once, and so is its ledger record (a sweep after
    a crash must not look for it), and the session's end does not destroy it again."""
    before = _live_guest_ids()
    result = _run(
        pytester,
        """
        from pytest_vmenv.plugin import plugin_key

        def _intents(config):
            ledger = config.stash[plugin_key].orchestrator.ledger.dir
            return sorted(p.name for p in ledger.glob("*.json") if p.name != "owner.json")

        def test_destroy(vm_factory, pytestconfig):
            a = vm_factory.create(name="a")
            assert len(_intents(pytestconfig)) == 1
            vm_factory.destroy(a)
            assert _intents(pytestconfig) == []
        """,
        "-rA",
    )
    result.assert_outcomes(passed=1)
    assert "teardown failures" not in result.stdout.str()
    assert _live_guest_ids() - before == set()


UNAVAILABLE_CONFTEST = """
from pytest_vmenv.errors import BackendUnavailable

class Unavailable:
    name = "emulator"
    def check(self):
        raise BackendUnavailable("emulator", "no namespaces on this host (simulated)")

def pytest_vmenv_make_backend(name, cls, options, config):
    return Unavailable()
"""


@pytest.mark.parametrize(("mode", "outcome"), [("skip", "skipped"), ("fail", "errors")])
def test_unavailable_backend_skip_or_fail(
    pytester: pytest.Pytester, mode: str, outcome: str
) -> None:
    pytester.makeconftest(UNAVAILABLE_CONFTEST)
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host")
        def test_x(vm):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rsf", f"--vm-unavailable={mode}"
    )
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines(
        ["*backend 'emulator' is unavailable: no namespaces on this host (simulated)*"]
    )
