"""The orchestrator acts on what a backend says it cannot do (its ``capabilities()``).

The real emulator, told by a ``pytest_vmenv_make_backend`` hook to report fewer capabilities
than it has: the plugin must then warn of ``network=`` once (in the report of the test that
asked).
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
            return replace(super().capabilities(), network=False)

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


def test_outbound_is_refused_with_the_reason(pytester: pytest.Pytester) -> None:
    """The emulator has no ``Capabilities.outbound``: a machine asking for it is refused, and
    only that one."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vm(image="host", outbound=True)
        def test_out(vm):
            pass

        @pytest.mark.vm(image="host")
        def test_plain(vm):
            vm.succeed("true")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_out: machine 'vm' (emulator) cannot be made here: outbound=True: the emulator "
            "backend gives machines no outbound network yet*"
        ]
    )
