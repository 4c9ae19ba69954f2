"""A service set up once per module: a module-scoped fixture on the module's machine.

`vm` and `vms` are per test, so a module-scoped fixture cannot take them; it takes
`module_vm` (or `module_vms["NAME"]`): the machine of the module's `scope="module"` mark,
the very machine every test here then gets from `vm`. (`session_vm`/`session_vms` do the
same for `scope="session"` marks and session-scoped fixtures.)
"""

import urllib.request

import pytest

pytestmark = pytest.mark.vm(image="web", scope="module")

SITE = "server { listen 8080; root /srv/site; }\n"


@pytest.fixture(scope="module")
def site(module_vm):
    """Add an nginx site on port 8080 once, for every test of this module."""
    module_vm.succeed("mkdir -p /srv/site && echo 'hello from the module' > /srv/site/index.html")
    module_vm.write_text("/etc/nginx/sites-enabled/site", SITE)
    module_vm.succeed("nginx -t && systemctl reload nginx && echo configured >> /run/site.log")
    module_vm.wait_for_port(8080, timeout=10)
    yield module_vm
    module_vm.succeed("rm /etc/nginx/sites-enabled/site && systemctl reload nginx")


def test_serves_the_page(site, vm):
    assert vm is site  # the test's machine is the fixture's: the site is configured in it
    with urllib.request.urlopen(vm.url(8080), timeout=10) as response:
        assert response.read() == b"hello from the module\n"


def test_site_was_configured_once(site, vm):
    vm.succeed("echo second > /srv/site/index.html")
    assert vm.succeed("curl -sf http://localhost:8080/") == "second\n"
    assert vm.read_text("/run/site.log") == "configured\n"  # once, before the first test
