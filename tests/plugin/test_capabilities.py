"""The orchestrator acts on what a backend says it cannot do (its ``capabilities()``).

The real emulator, told by a ``pytest_vmenv_make_backend`` hook to report fewer capabilities
than it has: the plugin must then warn of ``network=`` once (in the report of the test that
asked) and leave the console out of a failure report, whatever the backend would have given.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator's network needs root")

LESS_CAPABLE = """
from dataclasses import replace

def pytest_vmenv_make_backend(name, cls, options, config):
    class LessCapable(cls):
        def capabilities(self):
            return replace(super().capabilities(), network=False, console_log=False)

    return LessCapable(options)
"""

WARNING = (
    "*CapabilityWarning: network='lan' is not a private network per environment on the "
    "emulator backend*"
)


def test_network_without_the_capability_warns_once(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(LESS_CAPABLE)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vm(image="host", name="a", network="lan")
        @pytest.mark.vm(image="host", name="b", network="lan")
        def test_one(vms):
            vms["a"].succeed("true")

        @pytest.mark.vm(image="host", name="c", network="lan", cpus=2)
        def test_two(vms):
            vms["c"].succeed("true")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*warnings summary*", "*test_one*", WARNING])


def test_no_console_section_without_a_console_log(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(LESS_CAPABLE)
    pytester.makepyfile(
        """
        def test_fails(vm):
            vm.succeed("echo to-the-console > /dev/console; true")
            assert False, "on purpose"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "vmenv vm: commands" in text
    assert "console (tail)" not in text
