"""``outbound=True`` on the emulator: NAT through slirp4netns, proven inside a test-made netns.

Each test runs a pytest under ``uplink.py`` in a network and mount namespace of its own (see
that module): the "outside" the guest reaches is a dnsmasq and an HTTP server on 192.0.2.1 in
that namespace, never a real address. The inner tests are ordinary marker tests, so the whole
plugin path is exercised: marker, template key, provisioning with the network, clone, teardown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.emulator import uplink

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("slirp4netns") is None or shutil.which("dnsmasq") is None,
    reason="needs root (for the test's own network namespace), slirp4netns and dnsmasq",
)

ROOT = Path("/var/lib/pytest-vmenv-test")
CANARY = "served-from-the-uplink-" + uuid.uuid4().hex[:8]
UPLINK = str(Path(uplink.__file__).resolve())
CHECKOUT = str(Path(__file__).resolve().parents[2])

INNER = """
import time
import pytest

URL = "http://{name}:{port}/canary"


@pytest.mark.vm(outbound=True, provision=["busybox wget -qO /root/fetched " + URL])
def test_provision_and_run_fetch_through_nat(vm):
    assert vm.succeed("cat /root/fetched") == "{canary}"
    assert vm.succeed("busybox wget -qO- " + URL) == "{canary}"
    assert "nameserver 10.0.2.3" in vm.succeed("cat /etc/resolv.conf")


@pytest.mark.vm(outbound=True)
def test_host_loopback_is_not_reachable(vm):
    fetch = "import urllib.request as u; print(u.urlopen('http://10.0.2.2:{loopback}/', timeout=3))"
    res = vm.run(["python3", "-c", fetch])
    assert res.exit_code == 1 and "URLError" in res.stderr, res


@pytest.mark.vm()
def test_without_outbound_nothing_outside_answers_and_fails_at_once(vm):
    start = time.monotonic()
    connect = "import socket; socket.create_connection(('{address}', {port}), timeout=5)"
    res = vm.run(["python3", "-c", connect])
    assert res.exit_code != 0 and "Network is unreachable" in res.stderr, res
    assert time.monotonic() - start < 2.0
"""


@pytest.fixture
def work() -> Iterator[Path]:
    path = ROOT / f"outbound-{uuid.uuid4().hex[:8]}"
    for d in ("www", "loopback", "state/tmp"):
        (path / d).mkdir(parents=True)
    for d in ("www", "loopback"):
        (path / d / "canary").write_text(CANARY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _slirps() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "slirp4netns"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_outbound_nat_dns_and_isolation(work: Path) -> None:
    (work / "test_inner.py").write_text(
        INNER.format(
            name=uplink.NAME, port=uplink.PORT, canary=CANARY, address=uplink.ADDRESS,
            loopback=uplink.LOOPBACK_CANARY_PORT,
        )
    )  # fmt: skip
    env = {
        **os.environ,
        "VMENV_STATE_DIR": str(work / "state"),
        "TMPDIR": str(work / "state" / "tmp"),
        "PYTHONPATH": CHECKOUT,
    }
    before = _slirps()
    inner = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(work)]
    res = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "--",
         sys.executable, UPLINK, str(work), "--", *inner],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "3 passed" in res.stdout, res.stdout
    assert not (_slirps() - before), "a slirp4netns outlived its machine"
