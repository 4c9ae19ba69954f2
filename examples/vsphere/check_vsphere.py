"""A vSphere example: each test gets a linked clone of the template, gone afterwards."""

import pytest


@pytest.mark.vm(image="debian", cpus=2, memory="1G")
def test_clone_is_a_fresh_machine(vm):
    assert vm.ip
    assert vm.succeed("nproc").strip() == "2"
    vm.write_text("/var/tmp/mark", "mine")
    assert vm.read_text("/var/tmp/mark") == "mine"


# provisioned once into a template (reused across sessions with --vm-reuse), cloned per test
@pytest.mark.vm(
    image="debian", cpus=2, memory="2G", provision=["apt-get install -y nginx"], ready="port:80"
)
def test_nginx_serves(vm):
    vm.wait_for_port(80, timeout=60)
    assert "nginx" in vm.succeed("curl -sI localhost")
