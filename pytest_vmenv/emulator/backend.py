"""EmulatorBackend: the built-in backend, Linux namespaces + overlayfs + cgroups.

One guest is a PID 1 in its own mount, UTS, IPC, network, PID and cgroup namespaces on an
overlay root (see :mod:`.rootfs`), forked by a zygote helper (:mod:`.zygote`) and driven over
a control socket (:mod:`.control`, :mod:`.guest`). Templates and snapshots are read-only
overlay layers under ``<state>/emulator/layers``; a clone is a new upper dir over a layer
stack (:mod:`.layers`). ``live_snapshot`` is False: a revert restarts the guest's processes
on the snapshot's files.

Every public method maps foreign exceptions into :mod:`pytest_vmenv.errors` here.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import errors
from ..backend import Capabilities, MachineRef, Result, Session, Snapshot
from . import layers, netglue
from .cgroups import Cgroups
from .control import CommandTimedOut, GuestDied
from .host import Guest, Zygote, read_meta, start_guest, stop_guest
from .images import base_stack

if TYPE_CHECKING:
    from ..spec import MachineSpec

__all__ = ["EmulatorBackend", "LimitNotApplied"]

NAME = "emulator"
_WARNED: set[str] = set()
_F = TypeVar("_F", bound=Callable[..., Any])


class LimitNotApplied(UserWarning):
    """A ``memory``/``cpus`` limit could not be enforced on this host (the guest still runs)."""


def _boundary(func: _F) -> _F:
    """Map OSError and friends to the error tree at the protocol boundary."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.VmenvError:
            raise
        except GuestDied as exc:
            raise errors.MachineGone(f"{NAME}: {exc.strerror or exc}") from exc
        except (OSError, ValueError, KeyError) as exc:
            raise errors.BackendError(f"{NAME}: {func.__name__} failed: {exc}") from exc

    return wrapper  # type: ignore[return-value]


class EmulatorBackend:
    """The ``emulator`` backend (see the module docstring); thread-safe."""

    name = NAME
    builtin_images: tuple[str, ...] = ("host",)

    def __init__(
        self, options: Mapping[str, Any] | None = None, state_dir: Path | None = None
    ) -> None:
        self.options = dict(options or {})
        self._state_arg = state_dir
        self._lock = threading.Lock()
        self._guests: dict[str, Guest] = {}
        self._zygote: Zygote | None = None
        self._cgroups: Cgroups | None = None
        self._net = netglue.Networks()

    # -- plumbing -----------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        if self._state_arg is None:
            from ..paths import state_dir

            self._state_arg = state_dir()
        return self._state_arg

    @property
    def emu_dir(self) -> Path:
        return self.state_dir / "emulator"

    def _deps(self) -> tuple[Zygote, Cgroups]:
        with self._lock:
            if self._zygote is None:
                self._zygote = Zygote(self.emu_dir / "zygote.log")
            if self._cgroups is None:
                self._cgroups = Cgroups()
            return self._zygote, self._cgroups

    def _guest(self, ref: MachineRef) -> Guest:
        with self._lock:
            guest = self._guests.get(ref.id)
        if guest is None or guest.conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} ({ref.id}) does not exist")
        return guest

    def _warn(self, problems: Sequence[str]) -> None:
        for problem in problems:
            if problem not in _WARNED:
                _WARNED.add(problem)
                warnings.warn(
                    f"emulator: {problem}; guests run without that limit",
                    LimitNotApplied,
                    stacklevel=3,
                )

    def _boot(self, guest: Guest, spec: MachineSpec) -> None:
        zygote, cgroups = self._deps()
        guest.memory, guest.cpus = spec.memory, spec.cpus
        with self._lock:
            self._guests[guest.id] = guest
        try:
            problems = start_guest(
                guest,
                zygote,
                cgroups,
                self.emu_dir / "layers",
                spec.memory,
                spec.cpus,
                min(spec.timeout, 60.0),
            )
        except TimeoutError as exc:
            tail = self._console(guest)
            self._destroy(guest.id)
            raise errors.BootTimeout(f"{NAME}: {exc}", tail) from exc
        except BaseException:
            self._destroy(guest.id)
            raise
        self._warn(problems)

    # -- protocol -----------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        limits = sys.platform.startswith("linux") and os.geteuid() == 0
        return Capabilities(
            live_snapshot=False, network=self._net.available(), limits=limits, console_log=True
        )

    def check(self) -> None:
        def no(reason: str) -> errors.BackendUnavailable:
            return errors.BackendUnavailable(NAME, reason)

        if not sys.platform.startswith("linux"):
            raise no(f"it needs Linux namespaces; this is {sys.platform}")
        if os.geteuid() != 0:
            raise no(
                "it needs root here (the unprivileged user-namespace mode is not "
                "implemented yet); run the tests as root"
            )
        try:
            with open("/proc/filesystems", encoding="ascii") as f:
                if "overlay" not in f.read():
                    raise no("the kernel has no overlayfs (try `modprobe overlay`)")
        except OSError as exc:
            raise no(f"cannot read /proc/filesystems: {exc}") from exc
        for ns in ("mnt", "pid", "net", "uts", "ipc", "cgroup"):
            if not os.path.exists(f"/proc/self/ns/{ns}"):
                raise no(f"the kernel lacks {ns} namespaces")

    @_boundary
    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        self.check()
        start = time.monotonic()
        with layers.build_lock(self.emu_dir, key) as final:
            done = layers.load(final)
            if done is not None:
                return done
            base = base_stack(spec.image, spec.image_config, self.emu_dir, self.state_dir)
            if not spec.provision:
                return layers.commit(final, key, spec.name, None, base, "")
            guest = Guest(
                id=f"t{uuid.uuid4().hex[:15]}",
                name=spec.name,
                session=session.id,
                dir=self.emu_dir / "guests" / "",
                stack=base,
            )
            guest.dir = self.emu_dir / "guests" / guest.id
            self._boot(guest, spec)
            try:
                log = layers.provision(guest, spec, start)
                stop_guest(guest)
                return layers.commit(final, key, spec.name, guest.dir / "upper", base, log)
            finally:
                self._destroy(guest.id)

    @_boundary
    def clone(self, snapshot: Snapshot, spec: MachineSpec, session: Session) -> MachineRef:
        stack = layers.stack_of(snapshot)
        guest = Guest(
            id=uuid.uuid4().hex[:16],
            name=spec.name,
            session=session.id,
            dir=Path(),
            stack=stack,
            network=spec.network,
        )
        guest.dir = self.emu_dir / "guests" / guest.id
        self._boot(guest, spec)
        if spec.network is not None:
            try:
                self._net.attach(guest, self._guests_snapshot(), self.state_dir)
            except BaseException:
                self._destroy(guest.id)
                raise
        return self._ref(guest)

    def _ref(self, guest: Guest) -> MachineRef:
        return MachineRef(
            backend=NAME,
            id=guest.id,
            name=guest.name,
            session=guest.session,
            ip=guest.ip,
            data={"pid": guest.pid, "dir": str(guest.dir)},
        )

    def _guests_snapshot(self) -> list[Guest]:
        with self._lock:
            return list(self._guests.values())

    @_boundary
    def execute(
        self,
        ref: MachineRef,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        conn = self._guest(ref).conn
        if conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} is stopped")
        start = time.monotonic()
        try:
            code, out, err = conn.execute(argv, input=input, env=env, user=user, timeout=timeout)
        except CommandTimedOut:
            raise errors.CommandTimeout(ref.name, list(argv), timeout or 0.0) from None
        return Result.from_bytes(code, out, err, time.monotonic() - start)

    def _file_request(self, ref: MachineRef, msg: dict[str, Any], fd: int) -> dict[str, Any]:
        conn = self._guest(ref).conn
        if conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} is stopped")
        reply = conn.request(msg, [fd], timeout=None)
        if "error" in reply:
            raise errors.BackendError(
                f"{NAME}: {msg['op']} {msg['path']!r} on {ref.name!r} failed: {reply['error']}"
            )
        return reply

    @_boundary
    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        src = Path(src)
        if src.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_in {src}: is a directory; only files "
                "can be copied (pack it with tar first)"
            )
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode & 0o7777
            self._file_request(ref, {"op": "put", "path": dst, "mode": mode}, fd)
        finally:
            os.close(fd)

    @_boundary
    def copy_out(self, ref: MachineRef, src: str, dst: Path) -> None:
        dst = Path(dst)
        if dst.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_out to {dst}: is a directory; give the file's path"
            )
        existed = dst.exists()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self._file_request(ref, {"op": "get", "path": src}, fd)
        except BaseException:
            os.close(fd)
            fd = -1
            if not existed:
                dst.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    @_boundary
    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        guest = self._guest(ref)
        snap = layers.live_snapshot(guest, name, self.emu_dir)
        guest.snapshots.append(snap.handle)
        guest.save()
        return snap

    @_boundary
    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        guest = self._guest(ref)
        stack = layers.stack_of(snapshot)
        zygote, cgroups = self._deps()
        self._net.detach(guest)
        stop_guest(guest)
        guest.stack = stack
        try:
            problems = start_guest(
                guest, zygote, cgroups, self.emu_dir / "layers", guest.memory, guest.cpus, 60.0
            )
        except BaseException:
            self._destroy(guest.id)
            raise
        self._warn(problems)
        if guest.network is not None:
            self._net.attach(guest, self._guests_snapshot(), self.state_dir)

    def _console(self, guest: Guest) -> str:
        """PID 1's boot log (and provision output), then what the guest wrote on its console."""
        parts = []
        for name in ("boot.log", "console.log"):
            try:
                fd = os.open(guest.dir / name, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                f.seek(max(0, os.fstat(fd).st_size - 65536))
                parts.append(f.read().decode("utf-8", "replace"))
        return "".join(parts)

    def console_log(self, ref: MachineRef) -> str:
        with self._lock:
            guest = self._guests.get(ref.id)
        return self._console(guest) if guest is not None else ""

    @_boundary
    def destroy(self, ref: MachineRef) -> None:
        self._destroy(ref.id)

    def _destroy(self, gid: str) -> None:
        with self._lock:
            guest = self._guests.pop(gid, None)
        gdir = self.emu_dir / "guests" / gid
        if guest is None:
            meta = read_meta(gdir)
            if meta is None and not gdir.exists():
                return
            guest = Guest(
                id=gid, name=str((meta or {}).get("name", "")), session="", dir=gdir, stack=[]
            )
            _zygote, cgroups = self._deps()
            guest.groups = cgroups.find(gid)
            guest.snapshots = list((meta or {}).get("snapshots", []))
        self._net.detach(guest)
        stop_guest(guest)
        in_use = {s for g in self._guests_snapshot() for s in g.stack}
        for handle in guest.snapshots:
            if handle not in in_use and not any(handle in s for s in in_use):
                layers.remove(Path(handle), self.emu_dir)
        shutil.rmtree(gdir, ignore_errors=True)

    @_boundary
    def remove_template(self, snapshot: Snapshot) -> None:
        layers.remove(Path(snapshot.handle), self.emu_dir)

    def owned(self, session: str | None = None) -> Iterable[MachineRef]:
        root = self.emu_dir / "guests"
        found: list[MachineRef] = []
        try:
            entries = sorted(root.iterdir())
        except OSError:
            return found
        for gdir in entries:
            meta = read_meta(gdir)
            if meta is None or (session is not None and meta.get("session") != session):
                continue
            found.append(
                MachineRef(
                    backend=NAME,
                    id=gdir.name,
                    name=str(meta.get("name", "")),
                    session=str(meta.get("session", "")),
                    ip=meta.get("ip"),
                    data={
                        "pid": meta.get("pid"),
                        "owner_pid": meta.get("owner_pid"),
                        "created": meta.get("created"),
                    },
                )
            )
        return found

    def close(self) -> None:
        """Destroy every guest this instance made and stop the zygote."""
        for guest in self._guests_snapshot():
            try:
                self._destroy(guest.id)
            except Exception as exc:  # noqa: BLE001 - keep releasing the rest
                warnings.warn(
                    f"emulator: could not destroy {guest.name!r}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._net.close()
        with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()
