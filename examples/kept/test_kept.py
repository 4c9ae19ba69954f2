"""A failing test whose machine is kept to look at: `pytest examples/kept --vm-keep failed`.

It fails on purpose, so `pytest examples` does not collect this directory (pytest.ini's
`norecursedirs`); name it to run it. The summary then prints `vmenv shell ID` for the kept
machine, to look at its web root and nginx log; `vmenv gc --all` removes it.
"""

import pytest


@pytest.mark.vm(name="broken", image="web")
def test_health_page(vm):
    vm.succeed("echo ok > /var/www/html/healthz")  # the page nginx should serve as /health
    status = vm.succeed("curl -s -o /dev/null -w '%{http_code}' http://localhost/health")
    assert status == "200", "GET /health: see /var/www/html and /var/log/nginx/access.log"
