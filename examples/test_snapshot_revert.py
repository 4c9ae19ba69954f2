"""Snapshot a machine, break it, and revert: files and services come back as they were."""

import pytest

pytestmark = pytest.mark.vm(image="web")


def test_snapshot_and_revert(vm):
    vm.succeed("echo 'release 1' > /var/www/html/index.html")
    assert vm.succeed("stat -c %a /var/www/html/index.html") == "644\n"
    before = vm.snapshot("before-upgrade")
    vm.succeed("echo 'not a config' > /etc/nginx/sites-enabled/default")
    vm.fail("systemctl restart nginx")  # the broken config keeps nginx down
    vm.revert(before)  # the machine restarts on the snapshot: systemd starts nginx again
    vm.wait_for_port(80, timeout=10)
    assert vm.succeed("curl -sf http://localhost/") == "release 1\n"


@pytest.mark.vm(image="web", isolation="revert")
@pytest.mark.parametrize("round", [1, 2, 3])
def test_revert_isolation(vm, round):
    # one machine for all three rounds, reverted to its template between them
    vm.fail("test -e /var/lib/marker")
    vm.succeed("touch /var/lib/marker")
