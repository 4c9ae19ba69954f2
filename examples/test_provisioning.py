"""Provision once, clone many times: `provision` runs when the template is built."""

import pytest

STEPS = [
    "mkdir -p /opt/app",
    "printf '#!/bin/sh\\necho app version 1.2\\n' > /opt/app/run",
    "chmod +x /opt/app/run",
]


@pytest.mark.vm(image="host", provision=STEPS)
def test_provisioned_app(vm):
    assert vm.succeed("/opt/app/run") == "app version 1.2\n"


@pytest.mark.vm(image="host", provision=STEPS)
def test_each_test_gets_a_fresh_clone(vm):
    # the previous test's clone is gone; this one starts from the same template
    vm.succeed("rm /opt/app/run")
    vm.fail("test -e /opt/app/run")


@pytest.mark.vm(image="host", provision=STEPS, ready="test -x /opt/app/run")
def test_ready_probe(vm):
    vm.succeed("/opt/app/run")
