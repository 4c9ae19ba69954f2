"""Stash keys shared by the plugin's modules (and by tests that inspect a run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .machine import Machine
from .spec import MachineSpec

if TYPE_CHECKING:
    from .plugin import VmenvPlugin

__all__ = ["machines_key", "plugin_key", "specs_key"]

specs_key = pytest.StashKey[list[MachineSpec]]()
machines_key = pytest.StashKey[dict[str, Machine]]()
plugin_key: pytest.StashKey[VmenvPlugin] = pytest.StashKey()
