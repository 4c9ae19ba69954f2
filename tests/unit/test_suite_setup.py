"""The suite itself: run without its dev extras, it says what to install before any test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_xdist_the_suite_asks_for_the_dev_extras() -> None:
    # -p no:xdist: what a Python without pytest-xdist has (the plugin is not there)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider",
         "tests/unit/test_spec.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 4, done.stdout + done.stderr
    assert "install the dev extras: pip install -e '.[dev]'" in done.stderr
    assert "unrecognized arguments" not in done.stdout + done.stderr
