"""The suite's own setup: the dev extras are there, and scratch files stay out of /tmp.

Some tests run pytest with ``-n`` (pytest-xdist, a dev extra): without it the suite stops at
once with what to install, instead of failing those tests on an unknown option.
"""

from __future__ import annotations

import os

import pytest

from pytest_vmenv.paths import state_dir

DEV_EXTRAS = "install the dev extras: pip install -e '.[dev]'"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        raise pytest.UsageError(
            f"the test suite needs pytest-xdist (some tests run pytest -n 2): {DEV_EXTRAS}"
        )
    if config.option.basetemp is None and not os.environ.get("TMPDIR"):
        config.option.basetemp = str(state_dir() / "pytest-tmp")
