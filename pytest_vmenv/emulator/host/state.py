"""What one backend instance holds for every guest: options, state dir, zygote, cgroup probe.

The zygote (:mod:`.spawner`) is started on the first spawn and the cgroup probe
(:mod:`.cgroups`) is made on first use, both once per instance; the emulator's state dir is
made 0700 (with its subdirs) on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ... import errors
from ...paths import register
from . import userns
from .cgroups import DEFAULT_PIDS_MAX, Cgroups
from .spawner import Zygote

__all__ = ["NAME", "State"]

NAME = "emulator"
_PRIVATE_DIRS = ("layers", "images", "guests", "networks", "disks")


class State:
    """Options, dirs and the lazily made helpers of one backend instance; thread-safe."""

    def __init__(self, options: Mapping[str, Any] | None, state_dir: Path | None) -> None:
        self.options = dict(options or {})
        self._state_arg = state_dir
        self._lock = threading.Lock()
        self._zygote: Zygote | None = None
        self._cgroups: Cgroups | None = None
        self._secured = False

    @property
    def state_dir(self) -> Path:
        if self._state_arg is None:
            from ...paths import state_dir

            self._state_arg = state_dir()
        return self._state_arg

    @property
    def emu_dir(self) -> Path:
        """``<state>/emulator``, made 0700 (with its subdirs) on first use by each instance.

        Snapshot layers can hold setuid binaries a guest made, and guest dirs hold control
        sockets: no host user but root may reach any of it.
        """
        path = self.state_dir / "emulator"
        if not self._secured:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            register(self.state_dir)  # so other sessions' host views hide it too
            os.chmod(path, 0o700)
            for sub in _PRIVATE_DIRS:
                (path / sub).mkdir(mode=0o700, exist_ok=True)
                os.chmod(path / sub, 0o700)
            self._secured = True
        return path

    @property
    def guests_dir(self) -> Path:
        return self.emu_dir / "guests"

    @property
    def pids_max(self) -> int | None:
        """``[tool.vmenv.backends.emulator] pids_max``: a guest's process limit (None: "max").

        Defaults to :data:`.cgroups.DEFAULT_PIDS_MAX`; ``"max"`` turns the limit off.
        """
        value = self.options.get("pids_max", DEFAULT_PIDS_MAX)
        if value == "max":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise errors.ConfigError(
                f"[tool.vmenv.backends.{NAME}] pids_max={value!r}: must be a whole number "
                f'>= 1 or "max" (no limit), e.g. pids_max = {DEFAULT_PIDS_MAX}'
            )
        return value

    @property
    def cgroups(self) -> Cgroups:
        """The cgroup probe (made on first use)."""
        with self._lock:
            if self._cgroups is None:
                self._cgroups = Cgroups(rootless=userns.rootless())
            return self._cgroups

    @property
    def zygote(self) -> Zygote:
        """The zygote handle (its process starts on the first spawn)."""
        with self._lock:
            if self._zygote is None:
                self._zygote = Zygote(self.emu_dir / "zygote.log")
            return self._zygote

    @property
    def zygote_pid(self) -> int | None:
        """The pid of this instance's zygote process (None until the first guest)."""
        return self._zygote.pid if self._zygote is not None else None

    def close(self) -> None:
        """Hang up the zygote (it kills its guests that are not kept)."""
        with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()
