"""Real QEMU guests on the libvirt backend: Debian 12 with systemd, nginx and curl.

Every machine is a clone of one template of the ``web`` image (``vmenv.toml``); a machine on
no network starts from the template's saved RAM state, the two of ``site`` boot on a private
network of their own.
"""

import pytest


@pytest.mark.vmenv("site")
def test_the_client_fetches_the_page_from_the_server(vms):
    server, client = vms["server"], vms["client"]
    assert server.ip and client.ip and server.ip != client.ip
    assert client.succeed("hostname").strip() == "client"
    assert server.succeed("systemctl is-active nginx").strip() == "active"
    server.succeed("echo 'hello from nginx' > /var/www/html/index.html")  # world-readable
    page = client.wait_until_succeeds("curl -fsS http://server/", timeout=120)
    assert page == "hello from nginx\n"


@pytest.mark.vm("web", memory="512M", timeout=900)
def test_a_service_managed_with_systemctl(vm):
    assert vm.succeed("systemctl is-active nginx").strip() == "active"
    vm.succeed("systemctl stop nginx")
    vm.fail("curl -fsS http://127.0.0.1/")
    vm.succeed("systemctl start nginx")
    assert "Welcome to nginx" in vm.succeed("curl -fsS http://127.0.0.1/")
    assert vm.succeed("hostname").strip() == vm.name


@pytest.mark.vm("web", memory="512M", timeout=900)
def test_a_unit_of_your_own(vm):
    vm.write_text(
        "/etc/systemd/system/ticker.service",
        "[Service]\nExecStart=/bin/sh -c 'while :; do date +%%s >> /run/ticks; sleep 1; done'\n",
    )
    vm.succeed("systemctl daemon-reload && systemctl start ticker")
    vm.wait_until_succeeds("test $(wc -l < /run/ticks) -ge 2", timeout=30)
    assert "ticker.service" in vm.succeed("systemctl list-units --state=active ticker.service")


@pytest.mark.vm(image="tiny", memory="256M")
def test_snapshot_and_revert_keep_running_processes(vm):
    vm.succeed("sleep 600 >/dev/null 2>&1 & echo $! > /run/sleeper")
    snap = vm.snapshot("with-sleeper")
    vm.succeed("kill $(cat /run/sleeper)")
    vm.revert(snap)
    vm.succeed("kill -0 $(cat /run/sleeper)")  # the RAM came back with the disk
