"""Real QEMU guests on the libvirt backend, from the built-in ``tiny`` image."""

import pytest

SERVE = "(while true; do nc -l -p 8080 < /srv/index.txt; done) >/dev/null 2>&1 &"


@pytest.mark.vm(image="tiny", memory="256M", provision=["echo provisioned > /etc/motd"])
def test_a_clone_of_the_provisioned_template(vm):
    assert vm.read_text("/etc/motd") == "provisioned\n"
    assert vm.succeed("hostname").strip() == vm.name
    vm.write_text("/var/tmp/scratch", "only in this clone")


@pytest.mark.vm(image="tiny", memory="256M", provision=["echo provisioned > /etc/motd"])
def test_each_test_gets_a_fresh_clone(vm):
    vm.fail("test -e /var/tmp/scratch")


@pytest.mark.vm(image="tiny", memory="256M")
def test_snapshot_and_revert_keep_running_processes(vm):
    vm.succeed("sleep 600 >/dev/null 2>&1 & echo $! > /run/sleeper")
    snap = vm.snapshot("with-sleeper")
    vm.succeed("kill $(cat /run/sleeper)")
    vm.revert(snap)
    vm.succeed("kill -0 $(cat /run/sleeper)")  # the RAM came back with the disk


@pytest.mark.vmenv("pair")
def test_client_reaches_server_by_name(vms):
    server, client = vms["server"], vms["client"]
    assert server.ip and client.ip and server.ip != client.ip
    server.succeed(SERVE)
    out = client.wait_until_succeeds("nc -w 2 server 8080 </dev/null", timeout=30)
    assert "hello from the server" in out
