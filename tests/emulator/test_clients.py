"""``vm.testinfra()`` and ``vm.ssh_config()`` on the emulator's ``host`` image.

testinfra's modules answer through the plugin's channel (no SSH); the host image has no sshd,
so ``ssh_config`` refuses it. What needs Debian (packages, systemd services, a real sshd) is
tested on ``debian-12`` on the emulator and on libvirt, in
``backends/libvirt/tests/test_debian_both.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_vmenv.backend import Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.errors import ConfigError
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec
from pytest_vmenv.testinfra import TestinfraOutputTruncated

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's host image needs Linux and root",
)


@pytest.fixture
def vm(backend: EmulatorBackend, template: Snapshot, session: Session) -> Iterator[Machine]:
    spec = MachineSpec(name="infra")
    ref = backend.clone(template, spec, session)
    try:
        yield Machine(backend, ref, spec)
    finally:
        backend.destroy(ref)


@pytest.fixture
def testinfra() -> object:
    return pytest.importorskip("testinfra", reason="the testinfra extra is not installed")


def test_run_quotes_arguments_and_keeps_status_streams_and_bytes(
    vm: Machine, testinfra: Any
) -> None:
    host = vm.testinfra()
    assert isinstance(host, testinfra.host.Host)
    tricky = "a b;'c\" $(touch /pwned)"
    out = host.run("printf %%s %s", tricky)
    assert (out.rc, out.stdout, out.stderr) == (0, tricky, "")
    assert vm.run("test -e /pwned").exit_code == 1
    out = host.run("echo oops >&2; exit 3")
    assert (out.rc, out.stdout, out.stderr) == (3, "", "oops\n")
    assert host.run("printf '\\377\\000x'").stdout_bytes == b"\xff\x00x"
    assert host.check_output("echo %s", "hi") == "hi"
    with pytest.raises(AssertionError, match="Unexpected exit code 1"):
        host.check_output("false")


def test_file_user_and_socket_modules_report_the_guests_values(vm: Machine, testinfra: Any) -> None:
    vm.write_text("/srv/conf", "key = 1\n")
    vm.succeed("chown nobody:nogroup /srv/conf && chmod 640 /srv/conf")
    host = vm.testinfra()
    conf = host.file("/srv/conf")
    assert conf.exists and conf.is_file and not conf.is_directory
    assert (conf.content_string, conf.mode, conf.user, conf.group) == (
        "key = 1\n", 0o640, "nobody", "nogroup",
    )  # fmt: skip
    assert conf.contains("^key = 1$") and not conf.contains("other")
    assert not host.file("/srv/absent").exists
    assert host.user("root").uid == 0 and host.user("nobody").exists
    assert not host.user("no-such-user").exists
    vm.succeed("(setsid python3 -m http.server --bind 127.0.0.1 8000 >/dev/null 2>&1 &)")
    vm.wait_for_port(8000)
    assert host.socket("tcp://127.0.0.1:8000").is_listening
    assert not host.socket("tcp://127.0.0.1:8001").is_listening
    assert not host.socket("tcp://0.0.0.0:8000").is_listening  # bound to loopback only


def test_user_and_sudo_go_through_the_channels_user_switch(vm: Machine, testinfra: Any) -> None:
    host = vm.testinfra()
    assert vm.run("command -v sudo").exit_code != 0  # the switch needs no sudo in the guest
    assert host.check_output("id -un") == "root"
    with host.sudo("nobody"):
        assert host.check_output("id -un") == "nobody"
        with host.sudo():
            assert host.check_output("id -un") == "root"
        assert host.check_output("id -un") == "nobody"
    assert host.check_output("id -un") == "root"
    assert vm.testinfra(user="nobody").check_output("id -un") == "nobody"


def test_output_past_the_cap_raises_instead_of_a_wrong_answer(vm: Machine, testinfra: Any) -> None:
    host = vm.testinfra(max_output=10)
    assert host.check_output("echo short") == "short"
    with pytest.raises(TestinfraOutputTruncated, match=r"max_output= to vm\.testinfra\(\)"):
        host.run("head -c 100 /dev/zero")


def test_without_testinfra_the_error_says_what_to_install() -> None:
    script = (
        "import sys\n"
        "sys.modules['testinfra'] = None\n"
        "from pytest_vmenv.testinfra import host_of\n"
        "host_of(None, user=None, timeout=None, max_output=1)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 1
    assert ConfigError.__name__ in run.stderr
    assert "pip install 'pytest-vmenv[testinfra]'" in run.stderr


def test_ssh_config_refuses_an_image_without_sshd_before_changing_it(vm: Machine) -> None:
    with pytest.raises(ConfigError, match=r"no sshd: add openssh-server to its packages"):
        vm.ssh_config()
    assert vm.run("grep -qs pytest-vmenv /root/.ssh/authorized_keys").exit_code != 0
    assert not (state_dir() / "scratch" / "ssh").exists()  # no key made for it
