"""Two machines on one private network, reachable by name."""

import pytest

SERVE = "cd /srv/www && exec python3 -m http.server 8080 >/dev/null 2>&1"
FETCH = "python3 -c \"import urllib.request as u; print(u.urlopen('http://server:8080/').read().decode())\""


@pytest.mark.vm(
    name="server",
    image="host",
    network="lan",
    provision=["mkdir -p /srv/www && echo hello > /srv/www/index.html"],
)
@pytest.mark.vm(name="client", image="host", network="lan")
def test_client_reaches_server(vms):
    server, client = vms["server"], vms["client"]
    assert server.ip and client.ip and server.ip != client.ip
    server.succeed(f"({SERVE}) &")
    server.wait_for_port(8080, timeout=10)
    assert client.succeed(FETCH).strip() == "hello"


@pytest.mark.vmenv("pair")
def test_environment_from_config(vms):
    server, client = vms["server"], vms["client"]
    server.succeed(f"({SERVE}) &")
    server.wait_for_port(8080, timeout=10)
    assert "hello from the server" in client.succeed(FETCH)


@pytest.mark.vm(image="host")
def test_no_network_by_default(vm):
    assert vm.ip is None
    # only loopback exists in the machine's own network namespace
    assert vm.succeed("ls /sys/class/net").split() == ["lo"]
