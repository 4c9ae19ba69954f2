"""A web server and a client on one private network: nginx on `server`, curl on `client`.

Machines of a test that name the same `network` share a network of their own and resolve each
other by name. The test process reaches a machine's port through `vm.url()` (a forward on the
host's loopback), with or without a network.
"""

import urllib.request

import pytest


@pytest.mark.vm(
    name="server",
    image="web",
    network="lan",
    provision=["echo hello > /var/www/html/index.html"],
)
@pytest.mark.vm(name="client", image="web", network="lan")
def test_client_fetches_a_page_by_name(vms):
    server, client = vms["server"], vms["client"]
    assert server.ip and client.ip and server.ip != client.ip
    server.wait_for_port(80, timeout=10)  # nginx, started by systemd at boot
    assert client.succeed("curl -sf http://server/") == "hello\n"
    # the server saw the client's own address
    assert server.succeed("cut -d' ' -f1 /var/log/nginx/access.log").split() == [client.ip]


@pytest.mark.vmenv("site")  # the same pair, declared once in vmenv.toml
def test_environment_from_config(vms):
    vms["server"].wait_for_port(80, timeout=10)
    assert vms["client"].succeed("curl -sf http://server/") == "hello from the server\n"


@pytest.mark.vm(image="web", provision=["echo 'hello, test' > /var/www/html/index.html"])
def test_fetch_from_the_test(vm):
    vm.wait_for_port(80, timeout=10)
    with urllib.request.urlopen(vm.url(80, "/index.html"), timeout=10) as response:
        assert response.status == 200
        assert response.read() == b"hello, test\n"
        assert response.headers["Server"].startswith("nginx")


@pytest.mark.vm(image="web")
def test_no_network_by_default(vm):
    assert vm.ip is None
    # only loopback exists in the machine's own network namespace
    assert vm.succeed("ls /sys/class/net").split() == ["lo"]
