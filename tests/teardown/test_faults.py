"""Fault injection: the emulator's "hypervisor connection" (its zygote) dies mid-session."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator's host image needs root")


def test_zygote_killed_mid_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, signal, time, pytest
        from pytest_vmenv.errors import MachineGone

        def kill_zygote(backend):
            os.kill(backend.zygote_pid, signal.SIGKILL)

        @pytest.mark.vm(image="host")
        def test_1_kill_between_tests(vm, vmenv_backend):
            vm.succeed("true")
            kill_zygote(vmenv_backend)

        @pytest.mark.vm(image="host")
        def test_2_next_test_gets_a_new_machine(vm):
            assert vm.succeed("echo fine") == "fine\\n"

        @pytest.mark.vm(image="host", name="victim")
        def test_3_kill_under_a_running_test(vm, vmenv_backend):
            kill_zygote(vmenv_backend)
            time.sleep(0.2)
            # the machine may die with its zygote: then the error says so, and nothing else
            try:
                vm.run("true")
            except MachineGone as exc:
                assert "machine 'victim'" in str(exc) and "is gone" in str(exc)

        @pytest.mark.vm(image="host")
        def test_4_and_the_session_goes_on(vm):
            vm.succeed("true")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    gc = pytester.run("python", "-m", "pytest_vmenv", "gc")
    assert "removed" not in gc.stdout.str(), gc.stdout.str()


def test_xdist_workers_share_one_template(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import os
        def pytest_vmenv_template_built(spec, snapshot, seconds):
            with open(os.path.join(os.environ["OUT_DIR"], "builds"), "a") as f:
                f.write(f"{seconds}\\n")
        """
    )
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host", provision=["sleep 1.5", "touch /var/tmp/provisioned"])
        @pytest.mark.parametrize("n", range(6))
        def test_t(vm, n):
            vm.succeed("test -e /var/tmp/provisioned")
        """
    )
    os.environ["OUT_DIR"] = str(pytester.path)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    finally:
        del os.environ["OUT_DIR"]
    result.assert_outcomes(passed=6)
    builds = [float(x) for x in (pytester.path / "builds").read_text().split()]
    assert len(builds) == 2, builds  # each worker got the template...
    assert sum(1 for b in builds if b >= 1.5) == 1, builds  # ...but only one booted and built it
