"""One machine per test: the `vm` fixture gives a fresh, isolated clone, gone afterwards."""

import pytest


@pytest.mark.vm(image="host", cpus=1, memory="256M")
def test_commands(vm):
    assert vm.succeed("echo hello") == "hello\n"
    assert vm.run("exit 3").exit_code == 3  # run() never raises on non-zero
    vm.fail("test -e /no/such/file")  # fail() expects a non-zero status
    assert vm.succeed("cat /proc/sys/kernel/hostname").strip() == vm.name


@pytest.mark.vm(image="host")
def test_writes_stay_in_the_machine(vm):
    vm.succeed("echo changed > /etc/motd-vmenv-example")
    assert vm.read_text("/etc/motd-vmenv-example") == "changed\n"
    # the host's file system is untouched: the guest writes into its own overlay
    import os

    assert not os.path.exists("/etc/motd-vmenv-example")


@pytest.mark.vm(image="host")
def test_own_process_tree(vm):
    # the guest has its own PID namespace: PID 1 is the guest's init, not the host's
    assert vm.succeed("echo $$").strip() != str(__import__("os").getpid())
    assert vm.succeed("cat /proc/1/cmdline | tr '\\0' ' '").strip()
