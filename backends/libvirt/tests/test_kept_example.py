"""examples/libvirt/kept, run as its docstring shows: its machine is kept, reachable, removed.

The example fails on purpose (so the libvirt examples leave it out); here it runs in a real
pytest subprocess with ``--vm-keep failed`` in examples/libvirt (its pytest.ini and
vmenv.toml), on this suite's state dir (``$VMENV_STATE_DIR``: the tiny image is built once).
After ``vmenv gc --all`` no domain, volume or file of the machine or its template is left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import libvirt
from vmenv_libvirt import LibvirtBackend

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "libvirt"


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=EXAMPLE, capture_output=True, text=True, timeout=timeout
    )


def vmenv(*args: str) -> subprocess.CompletedProcess[str]:
    return run("-m", "pytest_vmenv", *args)


def _left(backend: LibvirtBackend, names: list[str]) -> list[str]:
    """Domains, pool volumes and files under ``<state>/libvirt`` whose name has one of ``names``."""
    conn = libvirt.open(backend.uris[0])
    try:
        found = [d.name() for d in conn.listAllDomains()]
        pool = backend.parts.pool.name
        if pool in conn.listStoragePools():
            found += conn.storagePoolLookupByName(pool).listVolumes()
    finally:
        conn.close()
    for _dir, _dirs, files in os.walk(backend.parts.paths.root):  # links are not followed
        found += files
    return [f for f in found if any(n in f for n in names)]


def test_kept_example_keeps_its_machine_until_gc(libvirt_backend: LibvirtBackend) -> None:
    result = run("-m", "pytest", "kept", "--vm-keep", "failed", timeout=600)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr  # one test failed
    assert "AssertionError: GET /health failed: see /srv/www in the kept machine" in out, out
    found = re.search(r"^broken \(libvirt, (\S+)\): vmenv shell (\S+)$", out, re.MULTILINE)
    assert found and found.group(1) == found.group(2), out
    machine = found.group(1)
    try:
        listing = vmenv("ls").stdout
        row = re.search(rf"^{machine}\s+broken\s+libvirt\s+(\S+)\s+\S+\s+kept$", listing, re.M)
        assert row, listing
        session = row.group(1)
        templates = [
            p.stem
            for p in (libvirt_backend.parts.paths.root / "templates").glob("*.json")
            if json.loads(p.read_text()).get("session") == session
        ]
        assert len(templates) == 1, templates  # left while the kept machine is built on it
        # the kept machine outlived pytest, with the failed test's files and its web server
        shell = vmenv("shell", machine, "--", "sh", "-c", "cat /srv/www/healthz; exit 7")
        assert (shell.returncode, shell.stdout) == (7, "ok\n"), shell
        page = vmenv("shell", machine, "--", "wget", "-q", "-O-", "http://127.0.0.1:8080/healthz")
        assert (page.returncode, page.stdout) == (0, "ok\n"), page
        assert _left(libvirt_backend, [machine]), "the kept machine's domain and disk"
    finally:
        gc = vmenv("gc", "--all")
    assert f"removed libvirt machine broken ({machine})" in gc.stdout, gc.stdout + gc.stderr
    assert machine not in vmenv("ls").stdout
    assert not _left(libvirt_backend, [machine, *templates]), gc.stdout
