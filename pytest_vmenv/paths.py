"""Where pytest-vmenv keeps its state: one stable directory, never /tmp.

``$VMENV_STATE_DIR``, else ``$XDG_STATE_HOME/pytest-vmenv``, else ``/var/lib/pytest-vmenv``
for root and ``~/.local/state/pytest-vmenv`` for everyone else. /tmp is avoided on purpose:
it may be a tmpfs that other tools clean or remount under a running session.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["state_dir"]


def state_dir() -> Path:
    """Return the state directory (created, mode 0700)."""
    if env := os.environ.get("VMENV_STATE_DIR"):
        path = Path(env)
    elif xdg := os.environ.get("XDG_STATE_HOME"):
        path = Path(xdg) / "pytest-vmenv"
    elif os.geteuid() == 0:
        path = Path("/var/lib/pytest-vmenv")
    else:
        path = Path.home() / ".local" / "state" / "pytest-vmenv"
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
