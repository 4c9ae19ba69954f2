"""Stash keys for what the plugin keeps on each test (and what tests of a run may inspect)."""

from __future__ import annotations

import pytest

from .machine import Machine
from .spec import MachineSpec

__all__ = ["machines_key", "specs_key"]

specs_key = pytest.StashKey[list[MachineSpec]]()
"""The machines a selected test declares, parsed at collection time."""

machines_key = pytest.StashKey[dict[str, Machine]]()
"""The machines a test got, by name, once it asked for them."""
