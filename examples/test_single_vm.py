"""One machine per test: the `vm` fixture gives a fresh, isolated Debian 12 clone."""

import os

import pytest

pytestmark = pytest.mark.vm(image="web", cpus=1, memory="256M")  # the recipe of vmenv.toml


def test_commands(vm):
    assert vm.succeed("echo hello") == "hello\n"
    assert vm.run("exit 3").exit_code == 3  # run() never raises on non-zero
    vm.fail("test -e /no/such/file")  # fail() expects a non-zero status
    assert "VERSION_CODENAME=bookworm" in vm.read_text("/etc/os-release")
    assert vm.succeed("hostname").strip() == vm.name


def test_a_real_machine(vm):
    # systemd is the guest's PID 1, and the image's packages run their services under it
    assert vm.succeed("cat /proc/1/comm").strip() == "systemd"
    assert vm.succeed("systemctl is-active nginx").strip() == "active"
    vm.succeed("useradd --create-home alice")
    assert vm.succeed("id -un; echo $HOME", user="alice") == "alice\n/home/alice\n"


def test_writes_stay_in_the_machine(vm):
    vm.succeed("echo changed > /etc/motd-vmenv-example")
    assert vm.read_text("/etc/motd-vmenv-example") == "changed\n"
    # the host's file system is untouched: the guest writes into its own overlay
    assert not os.path.exists("/etc/motd-vmenv-example")
