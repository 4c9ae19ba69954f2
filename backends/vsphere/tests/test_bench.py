"""``bench/bench_vsphere.py`` finds vcsim where ``.ci/vsphere.sh start`` puts it: in the env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_vsphere.py"


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "(GOVC_URL and VMENV_VCSIM_CA not set)"),
        ({"GOVC_URL": "https://127.0.0.1:1/sdk"}, "(VMENV_VCSIM_CA not set)"),
    ],
)
def test_bench_without_vcsim_in_the_environment_says_how_to_start_it(
    env: dict[str, str], missing: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOVC_URL", "VMENV_VCSIM_CA")}
    done = subprocess.run(
        [sys.executable, str(BENCH)], env={**clean, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"vcsim is not running here {missing}" in done.stderr
    assert 'exports=$(bash .ci/vsphere.sh start) && eval "$exports"' in done.stderr
    assert "Traceback" not in done.stderr
