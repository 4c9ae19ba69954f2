"""Keep the suite's scratch files out of /tmp (shared space that other tools clean)."""

from __future__ import annotations

import os

import pytest

from pytest_vmenv.paths import state_dir


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.option.basetemp is None and not os.environ.get("TMPDIR"):
        config.option.basetemp = str(state_dir() / "pytest-tmp")
