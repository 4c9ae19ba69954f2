"""A service started once per module: a module-scoped fixture on the module's machine.

`vm` and `vms` are per test, so a module-scoped fixture cannot take them; it takes
`module_vm` (or `module_vms["NAME"]`): the machine of the module's `scope="module"` mark,
the very machine every test here then gets from `vm`. (`session_vm`/`session_vms` do the
same for `scope="session"` marks and session-scoped fixtures.)
"""

import pytest

pytestmark = pytest.mark.vm(
    image="host",
    scope="module",
    provision=["mkdir -p /srv/www && echo 'hello from the module' > /srv/www/index.html"],
)

SERVE = "nohup python3 -m http.server 8000 >/dev/null 2>&1"
FETCH = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').read().decode())\""


@pytest.fixture(scope="module")
def web(module_vm):
    """Start the web server once, for every test of this module."""
    module_vm.succeed("echo started >> /run/web.starts")
    module_vm.succeed(f"cd /srv/www && ({SERVE} & echo $! > /run/web.pid)")
    module_vm.wait_for_port(8000, timeout=10)
    yield module_vm
    module_vm.succeed("kill $(cat /run/web.pid)")  # runs before the machine is released


def test_serves_the_page(web, vm):
    assert vm is web  # the test's machine is the fixture's: the server runs in it
    assert vm.succeed(FETCH).strip() == "hello from the module"


def test_server_was_started_once(web, vm):
    vm.succeed("echo second > /srv/www/index.html")
    assert vm.succeed(FETCH).strip() == "second"
    assert vm.read_text("/run/web.starts") == "started\n"  # once, before the first test
