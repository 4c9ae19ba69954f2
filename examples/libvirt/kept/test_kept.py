"""A failing test whose machine is kept to look at: `python -m pytest kept --vm-keep failed`
(from examples/libvirt).

It fails on purpose, so `python -m pytest` here does not collect this directory (pytest.ini's
`norecursedirs`); name it to run it. The machine is a `tiny` one (it boots in seconds, where a
Debian one takes a minute under TCG). The summary then prints `vmenv shell ID` for the kept
machine: its web root is still there and its web server still answers. `vmenv gc --all`
removes it (its domain, its disk in the pool, its console log, and then its template).
"""

import pytest


@pytest.mark.vm(name="broken", image="tiny", memory="256M")
def test_health_page(vm):
    vm.succeed("mkdir -p /srv/www && echo ok > /srv/www/healthz")  # the page meant as /health
    vm.succeed("httpd -p 8080 -h /srv/www")  # busybox's web server, left running in the machine
    status = vm.run("wget -q -O /dev/null http://127.0.0.1:8080/health")
    assert status.exit_code == 0, "GET /health failed: see /srv/www in the kept machine"
