"""Provision once, clone many times: `provision` runs when the template is built."""

import pytest

STEPS = [
    "useradd --system --home-dir /opt/app --shell /usr/sbin/nologin app",
    "mkdir -p /opt/app && printf '#!/bin/sh\\necho app 1.2 as $(id -un)\\n' > /opt/app/run",
    "chmod 755 /opt/app/run",
]


@pytest.mark.vm(image="web", provision=STEPS)
def test_provisioned_app(vm):
    assert vm.succeed("/opt/app/run", user="app") == "app 1.2 as app\n"


@pytest.mark.vm(image="web", provision=STEPS)
def test_each_test_gets_a_fresh_clone(vm):
    # the previous test's clone is gone; this one starts from the same template
    vm.succeed("rm /opt/app/run")
    vm.fail("test -e /opt/app/run")


@pytest.mark.vm(image="web", provision=STEPS, ready="curl -sf http://localhost/ >/dev/null")
def test_ready_probe(vm):
    # handed over only once nginx answers (`ready=` may also be "port:80")
    assert "Welcome to nginx!" in vm.succeed("curl -sf http://localhost/")
