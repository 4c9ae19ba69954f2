"""How the plugin's own failures read: the message, the step, its output, the console tail,
and a hint at the likely cause; the plugin's frames only when --vm-debug or -vv asks.

Real emulator machines, driven through pytester subprocesses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator's host image needs root")

PLUGIN_FRAME = "pytest_vmenv/"


@pytest.fixture(autouse=True)
def _no_debug_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMENV_DEBUG", raising=False)


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def _section(result: pytest.RunResult, title: str) -> list[str]:
    """The lines of the report's ``title`` section (``ERRORS``, ``FAILURES``)."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if line.strip("= ") == title)
    end = next(
        (i for i, line in enumerate(lines[start + 1 :], start + 1) if line.startswith("=")),
        len(lines),
    )
    return lines[start:end]


def _plugin_frames(lines: list[str]) -> list[str]:
    return [line for line in lines if PLUGIN_FRAME in line or "vmenv_libvirt/" in line]


PROVISION_100 = """
import pytest
@pytest.mark.vm(image="host", name="box",
                provision=["echo fetched-nothing; echo 'E: step broke' >&2; exit 100"])
def test_x(vm):
    pass
"""


def test_provision_failure_is_the_message_not_a_traceback(pytester: pytest.Pytester) -> None:
    result = _run(pytester, PROVISION_100)
    result.assert_outcomes(errors=1)
    errors = _section(result, "ERRORS")
    text = "\n".join(errors)
    assert "ProvisionError: emulator: provision step" in text
    assert "exit 100" in text and "of 'box' exited with 100" in text  # the step, its status
    assert "fetched-nothing" in text and "E: step broke" in text  # its output
    assert "--vm-debug" in text  # how to see more
    assert _plugin_frames(result.stdout.lines) == []
    assert len(errors) < 40, "\n".join(errors)


@pytest.mark.parametrize("how", ["--vm-debug", "-vv", "VMENV_DEBUG=1", "ini vmenv_debug"])
def test_debug_shows_the_plugin_frames(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    plain = _run(pytester, PROVISION_100)
    assert _plugin_frames(plain.stdout.lines) == []  # the switch, and only it, shows them
    args: list[str] = []
    if how.startswith("VMENV_DEBUG"):
        monkeypatch.setenv("VMENV_DEBUG", "1")
    elif how.startswith("ini"):
        pytester.makeini("[pytest]\nvmenv_debug = true\n")
    else:
        args.append(how)
    result = _run(pytester, PROVISION_100, *args)
    result.assert_outcomes(errors=1)
    assert "E: step broke" in result.stdout.str()
    frames = _plugin_frames(result.stdout.lines)
    assert any("orchestrator.py" in line for line in frames), result.stdout.str()
    assert any("layers.py" in line for line in frames)


def test_ready_timeout_shows_the_probe_and_the_console(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host", ready="echo probe-said-no >&2; false", timeout=2)
        def test_x(vm):
            pass
        """,
    )
    result.assert_outcomes(errors=1)
    errors = _section(result, "ERRORS")
    text = "\n".join(errors)
    assert "BootTimeout: machine 'vm' was not ready" in text
    assert "--- console (tail) ---" in text and "vmenv: guest vm up" in text
    assert _plugin_frames(result.stdout.lines) == []
    assert len(errors) < 40, text


def test_errors_in_a_test_show_the_tests_line(pytester: pytest.Pytester) -> None:
    """vm.succeed, a timed-out vm.run, vm_factory.create: the test's frame and the message;
    the error keeps its type, so a test can still catch it."""
    result = _run(
        pytester,
        """
        import pytest
        from pytest_vmenv import ProvisionError

        @pytest.mark.vm(image="host", name="box")
        def test_succeed(vm):
            vm.succeed("echo out; exit 5")

        @pytest.mark.vm(image="host", name="box")
        def test_timeout(vm):
            vm.run("sleep 30", timeout=0.5)

        def test_factory_error_is_catchable(vm_factory):
            with pytest.raises(ProvisionError, match="exited with 7"):
                vm_factory.create(provision=["exit 7"])

        def test_factory(vm_factory):
            vm_factory.create(name="made", provision=["echo made-broke >&2; exit 9"])
        """,
    )
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines(
        [
            '>       vm.succeed("echo out; exit 5")',
            "E       pytest_vmenv.errors.CommandFailed: command on 'box' exited with 5*",
            '>       vm.run("sleep 30", timeout=0.5)',
            "E       pytest_vmenv.errors.CommandTimeout: command on 'box' timed out*",
            '>       vm_factory.create(name="made", provision=*',
            "E       pytest_vmenv.errors.ProvisionError: emulator: provision step*",
            "E*made-broke",
        ]
    )
    failures = _section(result, "FAILURES")
    assert _plugin_frames(failures) == [], "\n".join(failures)
    assert "The above exception was the direct cause" not in result.stdout.str()


def test_a_failed_fetch_says_there_is_no_network(pytester: pytest.Pytester) -> None:
    """A fetch that fails for want of a network gets the hint; one that fails for another
    reason (no such package) and a local step do not. The guest's network namespace has no
    interface but loopback, so curl's name lookup fails inside it: nothing leaves."""
    if shutil.which("curl") is None or shutil.which("apt-get") is None:
        pytest.fail("needs curl and apt-get on the host (the host image runs the host's programs)")
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host", provision=["curl -sSf http://deb.debian.org/debian/"])
        def test_fetch(vm):
            pass
        @pytest.mark.vm(image="host", provision=["apt-get install -y vmenv-no-such-package"])
        def test_no_such_package(vm):
            pass
        @pytest.mark.vm(image="host", provision=["echo local-step >&2; exit 3"])
        def test_local(vm):
            pass
        """,
    )
    result.assert_outcomes(errors=3)
    text = "\n".join(_section(result, "ERRORS"))
    fetch, rest = text.split("ERROR at setup of test_no_such_package")
    package, local = rest.split("ERROR at setup of test_local")
    assert "Could not resolve host" in fetch
    assert "the machine has no outbound network, so 'curl' cannot download" in fetch
    assert "vm.put" in fetch and "outbound=" not in fetch and "packages=" not in fetch
    assert "exited with 100" in package and "outbound network" not in package
    assert "local-step" in local and "outbound network" not in local


def test_a_missing_command_is_named(pytester: pytest.Pytester) -> None:
    start = time.monotonic()
    result = _run(
        pytester,
        """
        import pytest
        @pytest.mark.vm(image="host", provision=["vmenv-no-such-tool --init"])
        def test_provision(vm):
            pass
        @pytest.mark.vm(image="host", provision=[["/usr/bin/vmenv-no-such-binary"]])
        def test_provision_argv(vm):
            pass
        @pytest.mark.vm(image="host", ready="vmenv-no-such-probe -h localhost", timeout=20)
        def test_ready(vm):
            pass
        """,
    )
    elapsed = time.monotonic() - start
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*provision step 'vmenv-no-such-tool --init' of 'vm' failed: command "
            "'vmenv-no-such-tool' not found in the guest image (exit 127; if it is there, the "
            "interpreter on its #! line is not)*",
            "*command '/usr/bin/vmenv-no-such-binary' not found in the guest image*",
            "*machine 'vm' was not ready (ready='vmenv-no-such-probe -h localhost'): command "
            "'vmenv-no-such-probe' not found in the guest image (exit 127*",
        ]
    )
    assert elapsed < 15, "a probe the image lacks must fail at once, not after timeout=20"


def _copy_program(root: Path, program: str) -> None:
    """``program`` and the libraries it loads, at their paths, under ``root``."""
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=False).stdout
    for path in [program, *(p for p in out.split() if p.startswith("/"))]:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(os.path.realpath(path), target)


def _broken_images(base: Path) -> dict[str, Path]:
    empty = base / "empty"
    empty.mkdir()
    # /bin/sh -> a path that exists on the host if followed out of the image, not inside it
    escaping = base / "escaping"
    (escaping / "bin").mkdir(parents=True)
    (escaping / "etc").mkdir()
    os.symlink("../../../../../../../../bin/sh", escaping / "bin" / "sh")
    tarball = base / "noshell.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(escaping / "etc", arcname="etc")
    script = base / "script"
    (script / "usr" / "bin").mkdir(parents=True)
    (script / "usr" / "bin" / "setup").write_text("#!/bin/vmenv-no-interpreter\n")
    os.chmod(script / "usr" / "bin" / "setup", 0o755)
    return {"empty": empty, "escaping": escaping, "tarball": tarball, "script": script}


def test_an_image_without_a_shell_is_refused_at_build(pytester: pytest.Pytester) -> None:
    images = _broken_images(pytester.path)
    good = pytester.path / "good"
    for program in ("/bin/sh", "/bin/cat"):
        _copy_program(good, program)
    (good / "etc").mkdir()
    os.rename(good / "bin" / "sh", good / "bin" / "dash")
    os.symlink("/bin/../bin/dash", good / "bin" / "sh")  # resolved inside the image
    result = _run(
        pytester,
        f"""
        import pytest
        @pytest.mark.vm(image={str(images["empty"])!r})
        def test_empty(vm):
            vm.succeed("true")
        @pytest.mark.vm(image={str(images["escaping"])!r}, provision=["echo hi"])
        def test_escaping(vm):
            pass
        @pytest.mark.vm(image={str(images["tarball"])!r}, ready="true", timeout=20)
        def test_tarball(vm):
            pass
        @pytest.mark.vm(image={str(images["script"])!r}, provision=[["setup"]])
        def test_script(vm):
            pass
        @pytest.mark.vm(image={str(good)!r}, provision=["echo built > /etc/built"])
        def test_good(vm):
            assert vm.succeed("cat /etc/built") == "built\\n"
        """,
    )
    result.assert_outcomes(errors=4, passed=1)
    result.stdout.fnmatch_lines(
        [
            f"ConfigError: emulator: image '{images['empty']}' is an empty directory*/bin/sh*",
            f"ConfigError: emulator: image '{images['escaping']}' cannot run provision step "
            "'echo hi': /bin/sh does not exist*",
            f"ConfigError: emulator: image '{images['tarball']}', unpacked in * cannot run "
            "ready='true': /bin/sh does not exist*",
            f"ConfigError: emulator: image '{images['script']}' cannot run provision step "
            "'setup': /usr/bin/setup needs /bin/vmenv-no-interpreter, but "
            "/bin/vmenv-no-interpreter does not exist*",
        ]
    )


def test_a_spare_that_was_not_ready_is_not_waited_for_twice(pytester: pytest.Pytester) -> None:
    """The spare of the second test is cloned while the first runs; its ``ready=`` fails.
    That failure is the test's error: no fresh clone waits out the same failure again."""
    result = _run(
        pytester,
        """
        import pytest
        def test_first(vm):
            vm.succeed("true")
        @pytest.mark.vm(image="host", ready="false", timeout=2)
        def test_never_ready(vm):
            pass
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*was not ready (ready='false')*"])
    result.stdout.fnmatch_lines(["emulator   ready     n=1 *"])
