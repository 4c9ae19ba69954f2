"""The emulator backend's plumbing: state paths, the zygote, finding and attaching guests.

Split from :mod:`.backend` (which holds the protocol methods) to keep both readable.
:func:`boundary` is the one place foreign exceptions become :mod:`pytest_vmenv.errors`;
:meth:`EmulatorBase._guest` is how every verb finds a guest, ours or another process's.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .. import errors
from ..backend import MachineRef
from ..paths import register
from .guest import seccomp
from .host import networks, userns
from .host.cgroups import DEFAULT_PIDS_MAX, Cgroups
from .host.control import GuestDied
from .host.lifecycle import Guest, connect, guest_from_meta, read_meta
from .host.spawner import Zygote, ZygoteGone

__all__ = ["NAME", "EmulatorBase", "LimitNotApplied", "boundary"]

NAME = "emulator"
_PRIVATE_DIRS = ("layers", "images", "guests", "networks", "disks")
_GUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_WARNED: set[str] = set()
_F = TypeVar("_F", bound=Callable[..., Any])


class LimitNotApplied(UserWarning):
    """A ``memory``/``cpus`` limit could not be enforced on this host (the guest still runs)."""


def boundary(func: _F) -> _F:
    """Map OSError and friends to the error tree at the protocol boundary."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.VmenvError:
            raise
        except (GuestDied, ZygoteGone) as exc:
            ref = next((a for a in args if isinstance(a, MachineRef)), None)
            what = f"machine {ref.name!r} ({ref.id}) is gone" if ref else "the guest is gone"
            raise errors.MachineGone(
                f"{NAME}: {what}: {exc.strerror or exc} (its PID 1 was killed or crashed, or "
                "the zygote that forked it died); destroy() removes what is left"
            ) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise errors.BackendError(f"{NAME}: {func.__name__} failed: {exc}") from exc

    return wrapper  # type: ignore[return-value]


class EmulatorBase:
    """State and helpers shared by the protocol methods; thread-safe."""

    def __init__(
        self, options: Mapping[str, Any] | None = None, state_dir: Path | None = None
    ) -> None:
        self.options = dict(options or {})
        self._state_arg = state_dir
        self._lock = threading.Lock()
        self._guests: dict[str, Guest] = {}
        self._attached: dict[str, Guest] = {}  # other processes' guests we talk to
        self._zygote: Zygote | None = None
        self._cgroups: Cgroups | None = None
        self._net = networks.Networks()
        self._secured = False

    @property
    def state_dir(self) -> Path:
        if self._state_arg is None:
            from ..paths import state_dir

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

    @staticmethod
    def _valid_id(gid: str) -> bool:
        return isinstance(gid, str) and _GUEST_ID.fullmatch(gid) is not None

    def _check_id(self, gid: str) -> None:
        """Refuse a machine id that is not one this backend makes (it names a directory)."""
        if not self._valid_id(gid):
            raise errors.BackendError(f"{NAME}: invalid machine id {gid!r}")

    def _deps(self, zygote: bool = True) -> tuple[Zygote | None, Cgroups]:
        """The zygote handle (started lazily on first spawn) and the cgroup probe."""
        with self._lock:
            if self._zygote is None and zygote:
                self._zygote = Zygote(self.emu_dir / "zygote.log")
            if self._cgroups is None:
                self._cgroups = Cgroups(rootless=userns.rootless())
            return self._zygote, self._cgroups

    def _spawner(self) -> tuple[Zygote, Cgroups]:
        zygote, cgroups = self._deps()
        assert zygote is not None
        return zygote, cgroups

    @property
    def zygote_pid(self) -> int | None:
        """The pid of this instance's zygote process (None until the first guest)."""
        return self._zygote.pid if self._zygote is not None else None

    def _guest(self, ref: MachineRef) -> Guest:
        """Our guest, or another process's (kept or live) reached through its ``ctl.sock``."""
        with self._lock:
            guest = self._guests.get(ref.id) or self._attached.get(ref.id)
        if guest is None:
            self._check_id(ref.id)
            guest = self._attach(ref)
        if guest.conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} ({ref.id}) does not exist")
        return guest

    def _attach(self, ref: MachineRef) -> Guest:
        gdir = self.emu_dir / "guests" / ref.id
        meta = read_meta(gdir)
        if meta is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} ({ref.id}) does not exist")
        _zygote, cgroups = self._deps(zygote=False)
        guest = guest_from_meta(ref.id, gdir, meta, cgroups)
        try:
            guest.conn = connect(gdir)
        except OSError as exc:
            raise errors.MachineGone(
                f"{NAME}: machine {ref.name!r} ({ref.id}) is gone: its PID 1 does not answer "
                f"({exc.strerror or exc}; its creator exited and it was not kept, or it "
                "crashed); destroy() removes what is left"
            ) from exc
        with self._lock:
            known = self._attached.setdefault(ref.id, guest)
        if known is not guest:
            guest.conn.close()
        return known

    def _own(self, ref: MachineRef, what: str) -> Guest:
        """A guest this instance created (snapshot/revert/keep change it: creator only)."""
        self._check_id(ref.id)
        with self._lock:
            guest = self._guests.get(ref.id)
        if guest is not None and guest.conn is not None:
            return guest
        if guest is None and read_meta(self.emu_dir / "guests" / ref.id) is not None:
            raise errors.BackendError(
                f"{NAME}: {what} of {ref.name!r} ({ref.id}): only the process that created "
                "a machine can do that"
            )
        raise errors.MachineGone(f"{NAME}: machine {ref.name!r} ({ref.id}) does not exist")

    def _guests_snapshot(self) -> list[Guest]:
        with self._lock:
            return list(self._guests.values())

    def _warn_unfiltered(self) -> None:
        """Once per process: on this architecture guests run without the seccomp filter."""
        if not seccomp.SUPPORTED and "seccomp" not in _WARNED:
            _WARNED.add("seccomp")
            warnings.warn(
                f"emulator: no seccomp filter on {platform.machine()} (x86_64 only); guests "
                "can use the host's kernel keyrings, bpf and perf_event_open",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn(self, problems: Sequence[str]) -> None:
        for problem in problems:
            if problem not in _WARNED:
                _WARNED.add(problem)
                warnings.warn(
                    f"emulator: {problem}; guests run without that limit",
                    LimitNotApplied,
                    stacklevel=3,
                )

    def _console(self, guest: Guest) -> str:
        """PID 1's boot log (and provision output), then what the guest wrote on its console."""
        parts = []
        for name in ("boot.log", "console.log.1", "console.log"):
            try:
                fd = os.open(guest.dir / name, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                f.seek(max(0, os.fstat(fd).st_size - 65536))
                parts.append(f.read().decode("utf-8", "replace"))
        return "".join(parts)
