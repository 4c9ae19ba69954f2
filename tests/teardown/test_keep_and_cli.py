"""--vm-keep, the `vmenv` command, failure artifacts and timings, on the real emulator."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_vmenv.emulator import EmulatorBackend

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator's host image needs root")


def vmenv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", *args], capture_output=True, text=True, timeout=60
    )


def shell_session(machine: str, script: bytes) -> tuple[int, bytes]:
    """Run `vmenv shell ID` on a real pty, type ``script``, return (exit code, screen)."""
    pid, master = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "pytest_vmenv", "shell", machine])
    os.write(master, script)
    screen = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(master)
    return os.waitstatus_to_exitcode(status), screen


def test_keep_failed_keeps_only_failed_tests_machines(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host", name="good")
        def test_good(vm):
            vm.succeed("true")
        @pytest.mark.vm(image="host", name="broken")
        def test_broken(vm):
            vm.succeed("echo evidence > /var/tmp/evidence")
            assert False, "broken on purpose"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--vm-keep=failed")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*vmenv: kept machines (remove with: vmenv gc --all)*",
            "broken (emulator, *): vmenv shell *",
        ]
    )
    machine_id = re.search(r"vmenv shell (\S+)", result.stdout.str()).group(1)  # type: ignore[union-attr]
    try:
        listing = vmenv("ls").stdout
        assert re.search(rf"{machine_id}\s+broken\s+emulator\s+\S+\s+\S+\s+kept", listing), listing
        assert "good" not in listing
        # the kept machine outlived its session and still has the failed test's state
        code, screen = shell_session(machine_id, b"cat /var/tmp/evidence; exit 3\n")
        assert code == 3 and b"evidence" in screen, screen
        assert "nothing to remove" in vmenv("gc").stdout  # plain gc spares kept machines
    finally:
        gc = vmenv("gc", "--all")
    assert f"({machine_id})" in gc.stdout, gc.stdout
    assert machine_id not in vmenv("ls").stdout


def test_keep_never_is_the_default(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host", name="broken")
        def test_broken(vm):
            assert False
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "kept machines" not in result.stdout.str()
    assert not [r for r in EmulatorBackend().owned(None) if r.kept]


def test_failure_artifacts_in_report_and_junit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host", name="box")
        def test_fails(vm):
            vm.run("echo the-first-command")
            vm.succeed("exit 5")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--junitxml=junit.xml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vmenv box: commands*", "$ echo the-first-command  -> exit 0 (*"])
    junit = (pytester.path / "junit.xml").read_text()
    assert 'property name="vmenv box commands"' in junit and "the-first-command" in junit


def test_timings_in_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host")
        @pytest.mark.parametrize("n", range(3))
        def test_t(vm, n):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*vmenv timings (session *",
            "emulator   clone     n=3 *median=*s max=*s",
            "emulator   teardown  n=3 *",
            "emulator   template  n=1 *",
            "slowest machines:*",
        ]
    )


def test_xdist_summary_has_every_workers_kept_machines_and_timings(
    pytester: pytest.Pytester,
) -> None:
    """The workers run the tests, the controller writes the summary: nothing may be lost."""
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host", name="box")
        @pytest.mark.parametrize("n", range(4))
        def test_t(vm, n):
            vm.succeed("true")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--vm-keep=always")
    out = result.stdout.str()
    kept = re.findall(r"^box \(emulator, (\S+)\): vmenv shell \1$", out, re.M)
    try:
        result.assert_outcomes(passed=4)
        assert len(set(kept)) == 4, out
        result.stdout.fnmatch_lines(
            [
                "*vmenv: kept machines (remove with: vmenv gc --all)*",
                "*vmenv timings (session *",
                "emulator   clone     n=* median=*s max=*s",
                "emulator   template  n=2 *",  # one lookup per worker
                "slowest machines:*",
            ]
        )
        session = re.search(r"vmenv timings \(session (\S+)\)", out).group(1)  # type: ignore[union-attr]
        listed = [r.id for r in EmulatorBackend().owned(session) if r.kept]
        assert sorted(listed) == sorted(kept), (listed, out)
    finally:
        gc = vmenv("gc", "--all")
    for machine_id in kept:
        assert f"({machine_id})" in gc.stdout, gc.stdout


def test_vmenv_backends_and_images() -> None:
    out = vmenv("backends").stdout
    assert re.search(r"^emulator\s+usable$", out, re.M), out
    assert vmenv("images").returncode == 0


def test_gc_removes_half_created_guest(tmp_path: Path) -> None:
    """A guest dir with labels but nothing started (its creator died at once) is swept."""
    from pytest_vmenv.backend import Session
    from pytest_vmenv.paths import state_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    from pytest_vmenv.backend import owner_token

    token = f"{owner_token().split(':')[0]}:{dead}:1"
    backend = EmulatorBackend()
    session = Session(id="half-created", state_dir=state_dir(), owner=token)
    gdir = backend.emu_dir / "guests" / "halfcreated0"
    gdir.mkdir(parents=True)
    (gdir / "meta.json").write_text(
        f'{{"id": "halfcreated0", "name": "x", "session": "{session.id}", "owner": "{token}",'
        f' "created": 1, "pid": 0}}'
    )
    out = vmenv("gc").stdout
    assert "halfcreated0" in out, out
    assert not gdir.exists()


def test_kept_machine_keeps_its_template_until_gc_removes_both(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session ends, its kept machine still stands on its template: the template stays
    (on disk, not just in the old overlay mount) until `vmenv gc --all` removes both."""
    state = tmp_path / "state"
    monkeypatch.setenv("VMENV_STATE_DIR", str(state))
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(image="host", name="prov",
                        provision=["echo provisioned > /var/tmp/provisioned"])
        def test_provisioned(vm):
            vm.succeed("true")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--vm-keep=always")
    result.assert_outcomes(passed=1)
    machine_id = re.search(r"vmenv shell (\S+)", result.stdout.str()).group(1)  # type: ignore[union-attr]
    layers = state / "emulator" / "layers"
    try:
        read = vmenv("shell", machine_id, "cat", "/var/tmp/provisioned")
        assert (read.returncode, read.stdout) == (0, "provisioned\n"), read
        templates = sorted(layers.glob("tpl-*"))
        assert len(templates) == 1, templates
        assert (templates[0] / "fs" / "var" / "tmp" / "provisioned").read_text() == "provisioned\n"
        spared = vmenv("gc").stdout  # plain gc spares both
        assert spared.startswith("left emulator template "), spared
        assert f"in use: machine prov ({machine_id})" in spared and "remove" not in spared
        assert templates[0].is_dir()
    finally:
        gc = vmenv("gc", "--all")
    assert f"({machine_id})" in gc.stdout, gc.stdout
    assert "template" in gc.stdout, gc.stdout
    assert not list(layers.glob("tpl-*")), list(layers.iterdir())
    assert machine_id not in vmenv("ls").stdout
    assert not list((state / "ledger").iterdir()), list((state / "ledger").rglob("*"))
