"""Snapshot a machine, break it, and revert."""

import pytest


@pytest.mark.vm(image="host")
def test_snapshot_and_revert(vm):
    vm.write_text("/etc/app.conf", "mode=safe\n")
    before = vm.snapshot("before-upgrade")
    vm.succeed("echo mode=broken > /etc/app.conf && rm -f /etc/hostname")
    vm.revert(before)
    assert vm.read_text("/etc/app.conf") == "mode=safe\n"


@pytest.mark.vm(image="host", isolation="revert")
@pytest.mark.parametrize("round", [1, 2, 3])
def test_revert_isolation(vm, round):
    # one machine for all three rounds, reverted to its template between them
    vm.fail("test -e /var/lib/marker")
    vm.succeed("touch /var/lib/marker")
