"""examples/kept, run as the README shows it: its machine is kept, reachable, then removed.

The example fails on purpose (so `pytest examples` leaves it out); here it runs in a real
pytest subprocess with ``--vm-keep failed`` on the examples' own config (the Debian image
``web`` of examples/vmenv.toml, built once into the state dir and shared with the examples).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_vmenv.images import builder_problem
from pytest_vmenv.paths import state_dir

CHECKOUT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the examples' Debian machines need root"),
    pytest.mark.skipif(
        builder_problem() is not None, reason=f"cannot build images: {builder_problem()}"
    ),
]


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=CHECKOUT, capture_output=True, text=True, timeout=timeout
    )


def vmenv(*args: str) -> subprocess.CompletedProcess[str]:
    return run("-m", "pytest_vmenv", *args)


def test_kept_example_keeps_its_machine_until_gc() -> None:
    result = run("-m", "pytest", "examples/kept", "--vm-keep", "failed", timeout=600)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr  # one test failed
    assert "AssertionError: GET /health: see /var/www/html" in out, out
    assert "assert '404' == '200'" in out, out
    found = re.search(r"^broken \(emulator, (\S+)\): vmenv shell (\S+)$", out, re.MULTILINE)
    assert found and found.group(1) == found.group(2), out
    machine = found.group(1)
    guest_dir = state_dir() / "emulator" / "guests" / machine
    try:
        listing = vmenv("ls").stdout
        assert re.search(rf"^{machine}\s+broken\s+emulator\s+\S+\s+\S+\s+kept$", listing, re.M)
        meta = json.loads((guest_dir / "meta.json").read_text())
        cgroups = meta.get("groups") or {}
        groups = [g for g in (cgroups.get("v2"), *cgroups.get("v1", {}).values()) if g]
        assert meta["kept"] and all(Path(g).is_dir() for g in groups), meta
        # the kept machine outlived pytest, with the failed test's state and its services
        shell = vmenv("shell", machine, "--", "sh", "-c", "cat /var/www/html/healthz; exit 7")
        assert (shell.returncode, shell.stdout) == (7, "ok\n"), shell
        log = vmenv("shell", machine, "--", "cat", "/var/log/nginx/access.log").stdout
        assert '"GET /health HTTP/1.1" 404' in log, log
        assert vmenv("shell", machine, "systemctl", "is-active", "nginx").stdout == "active\n"
    finally:
        gc = vmenv("gc", "--all")
    assert f"removed emulator machine broken ({machine})" in gc.stdout, gc.stdout + gc.stderr
    assert machine not in vmenv("ls").stdout
    assert not guest_dir.exists()
    assert not [g for g in groups if Path(g).exists()]  # its cgroups went with it
