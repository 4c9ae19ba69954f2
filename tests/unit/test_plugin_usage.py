"""Collection-time validation through pytest itself (pytester): usage errors, never tracebacks."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def _usage_error(pytester: pytest.Pytester, source: str, *patterns: str) -> None:
    pytester.makepyfile(source)
    result = pytester.runpytest_subprocess("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: pytest-vmenv:", *patterns])
    assert "Traceback" not in result.stderr.str()


def test_unknown_field(pytester: pytest.Pytester) -> None:
    _usage_error(
        pytester,
        """
        import pytest
        @pytest.mark.vm(colour="red")
        def test_a(vm): pass
        """,
        "*test_unknown_field.py::test_a: @pytest.mark.vm: unknown field 'colour'. Choose one of:*",
    )


def test_bad_values_all_reported(pytester: pytest.Pytester) -> None:
    _usage_error(
        pytester,
        """
        import pytest
        @pytest.mark.vm(cpus="lots")
        def test_cpus(vm): pass
        @pytest.mark.vm(memory="12Q")
        def test_memory(vm): pass
        @pytest.mark.vm(backend="xen")
        def test_backend(vm): pass
        @pytest.mark.vm(image="no-such-image")
        def test_image(vm): pass
        """,
        "*::test_cpus: @pytest.mark.vm: cpus='lots' must be a whole number*",
        "*::test_memory: @pytest.mark.vm: memory='12Q' is not a size*",
        "*::test_backend: @pytest.mark.vm: backend='xen' is not installed. Choose one of:*",
        "*::test_image: @pytest.mark.vm: unknown image 'no-such-image' for backend 'emulator'. "
        "Choose one of: debian-12, host*",
    )


def test_duplicate_names_and_vm_with_two_machines(pytester: pytest.Pytester) -> None:
    _usage_error(
        pytester,
        """
        import pytest
        @pytest.mark.vm(name="a")
        @pytest.mark.vm(name="a")
        def test_dup(vms): pass
        @pytest.mark.vm(name="a")
        @pytest.mark.vm(name="b")
        def test_two(vm): pass
        """,
        "*::test_dup: two machines are named 'a'*",
        "*::test_two: the fixture 'vm' needs exactly one machine, but the test has 2 (a, b)*",
    )


def test_unknown_environment(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".toml", vmenv='[environments.stack]\nmachines = { a = { image = "host" } }\n'
    )
    _usage_error(
        pytester,
        """
        import pytest
        @pytest.mark.vmenv("stak")
        def test_env(vms): pass
        """,
        "*::test_env: @pytest.mark.vmenv: unknown environment 'stak' *Choose one of: stack",
    )


def test_bad_option_value(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess("--vm-parallel=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--vm-parallel=0 must be at least 1*"])


def test_env_twin_of_option(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMENV_KEEP", "sometimes")
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--vm-keep='sometimes'. Choose one of: never, failed, always*"])


def test_markers_registered_with_signature(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(
        ['@pytest.mark.vm(image="host", *, name="vm", backend=None, cpus=1, memory="512M"*',
         '@pytest.mark.vmenv(name)*']
    )  # fmt: skip


def test_plain_tests_unaffected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass\ndef test_b(): assert 1")
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


_ONLY_CORE = """
import importlib.metadata

import pytest_vmenv.session_plugin
from pytest_vmenv.registry import GROUP, Registry

# this run sees the core alone, as after `pip install pytest-vmenv`
_core = [ep for ep in importlib.metadata.entry_points(group=GROUP) if ep.name == "emulator"]
pytest_vmenv.session_plugin.Registry = lambda: Registry(_core)
"""


@pytest.mark.parametrize(
    ("args", "mark", "toml", "pattern"),
    [
        (
            ["--vm-backend", "kvm"],
            "",
            "",
            "backend 'kvm' (--vm-backend *) is not installed (the libvirt backend); install it "
            "with: pip install pytest-vmenv-libvirt. Choose one of: emulator",
        ),
        (
            [],
            '@pytest.mark.vm(backend="libvirt")',
            "",
            "*::test_a: @pytest.mark.vm: backend='libvirt' is not installed; install it with: "
            "pip install pytest-vmenv-libvirt. Choose one of: emulator",
        ),
        (
            [],
            "",
            'backend = "vsphere"\n',
            "backend 'vsphere' (*vmenv.toml backend) is not installed; install it with: "
            "pip install pytest-vmenv-vsphere. Choose one of: emulator",
        ),
        (
            [],
            '@pytest.mark.vmenv("stack")',
            '[environments.stack]\nmachines = { db = { backend = "vsphere" } }\n',
            "*::test_a: @pytest.mark.vmenv (*vmenv.toml: environments.stack.machines.db): "
            "backend='vsphere' is not installed; install it with: pip install "
            "pytest-vmenv-vsphere. Choose one of: emulator",
        ),
    ],
    ids=["option", "mark", "toml-default", "toml-environment"],
)
def test_missing_backend_says_which_distribution_to_install(
    pytester: pytest.Pytester, args: list[str], mark: str, toml: str, pattern: str
) -> None:
    pytester.makeconftest(_ONLY_CORE)
    if toml:
        pytester.makefile(".toml", vmenv=toml)
    fixture = "vms" if "vmenv" in mark else "vm"
    pytester.makepyfile(f"import pytest\n{mark}\ndef test_a({fixture}): pass\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: pytest-vmenv:", pattern])
    assert "Traceback" not in result.stderr.str()


def test_run_refuses_an_empty_command_and_bad_env_names_before_any_backend() -> None:
    from pytest_vmenv.backend import MachineRef
    from pytest_vmenv.machine import Machine
    from pytest_vmenv.spec import MachineSpec

    class NoBackend:
        name = "none"

        def execute(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("reached the backend")

    vm = Machine(NoBackend(), MachineRef("none", "1", "web", "s"), MachineSpec(name="web"))  # type: ignore[arg-type]
    for command in ("", [], [""]):
        with pytest.raises(ValueError, match="web: run needs a command"):
            vm.run(command)
    for name in ("", "A=B", "A\0"):
        with pytest.raises(ValueError, match="is not a valid variable name"):
            vm.run("true", env={name: "1"})
