"""EmulatorBackend: the built-in backend, Linux namespaces + overlayfs + cgroups.

One guest is a PID 1 in its own mount, UTS, IPC, network, PID and cgroup namespaces on an
overlay root (see :mod:`.rootfs`), forked by a zygote helper (:mod:`.zygote`) and driven over
a control socket (:mod:`.control`, :mod:`.guest`). Templates and snapshots are read-only
overlay layers under ``<state>/emulator/layers``; a clone is a new upper dir over a layer
stack (:mod:`.layers`). ``live_snapshot`` is False: a revert restarts the guest's processes
on the snapshot's files.

Everything is labelled on disk (guest ``meta.json``, layer ``meta.json``: session, owner
token, created), and every method that takes a :class:`MachineRef` also works from another
process on a ref from :meth:`EmulatorBackend.owned`: ``destroy`` kills by the recorded
cgroups and verified pids, the verbs (``execute``, ``copy_in``, ``copy_out``, ``shell``)
connect to the guest's ``ctl.sock`` (see :mod:`.guest`). That is what ``vmenv gc``,
``vmenv shell`` and the crash sweeper rely on.

Every public method maps foreign exceptions into :mod:`pytest_vmenv.errors` here.

Run unprivileged, guests live in a user namespace (see :mod:`.userns`): rootfs-directory and
tarball images work; ``image="host"`` and ``network=`` are refused: :meth:`unavailable_for`
says why for each spec (the orchestrator asks before it uses one), and ``build_template``/
``clone`` raise ``BackendUnavailable`` with the same reason. ``memory``/``cpus`` are not
applied (``LimitNotApplied``, once).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
import uuid
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..backend import (
    GET_LIMIT,
    OUTPUT_LIMIT,
    Cache,
    Capabilities,
    MachineRef,
    Result,
    Session,
    Snapshot,
)
from ..images import BASES, ImageCache, builder_problem, recipe_of
from .base import NAME, EmulatorBase, LimitNotApplied, boundary
from .host import caches, disk, inventory, layers, userns
from .host.control import FILE_IDLE_TIMEOUT, CommandTimedOut, TooLarge
from .host.images import base_stack, check_image, is_host, refresh_mask
from .host.lifecycle import Guest, guest_from_meta, read_meta, start_guest, stop_guest, wait_systemd
from .host.spawner import Zygote
from .host.terminal import run_shell

if TYPE_CHECKING:
    from ..spec import MachineSpec

__all__ = ["EmulatorBackend", "LimitNotApplied"]

DEBIAN_REASON = (
    "Debian images need root for now (an unprivileged guest maps only uid 0, and a Debian "
    "tree holds files of root and of system users); run as root"
)
SYSTEMD_REASON = (
    "init='systemd' needs root (systemd needs a cgroup subtree of its own); use init='none', "
    "or run as root"
)


class EmulatorBackend(EmulatorBase):
    """The ``emulator`` backend (see the module docstring); thread-safe."""

    name = NAME
    builtin_images: tuple[str, ...] = ("host", *BASES)

    def _boot(self, guest: Guest, spec: MachineSpec) -> None:
        self._warn_unfiltered()
        zygote, cgroups = self._spawner()
        guest.memory, guest.cpus, guest.disk = spec.memory, spec.cpus, spec.disk
        guest.init = self._init_of(spec)
        with self._lock:
            self._guests[guest.id] = guest
        timeout = min(spec.timeout, 60.0)
        started = time.monotonic()
        try:
            problems = start_guest(
                guest,
                zygote,
                cgroups,
                self.emu_dir / "layers",
                spec.memory,
                spec.cpus,
                timeout,
                self.pids_max,
            )
            if guest.init == "systemd":
                wait_systemd(guest, timeout - (time.monotonic() - started))
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
        root = sys.platform.startswith("linux") and not userns.rootless()
        network = root and self._net.available()
        return Capabilities(live_snapshot=False, network=network, limits=root, console_log=True)

    def _delegated(self) -> bool:
        """Unprivileged: whether delegated cgroups hold the memory and cpu limits."""
        cgroups = self._deps(zygote=False)[1]
        return cgroups.offers("memory") and cgroups.offers("cpu")

    def check(self) -> None:
        def no(reason: str) -> errors.BackendUnavailable:
            return errors.BackendUnavailable(NAME, reason)

        if not sys.platform.startswith("linux"):
            raise no(f"it needs Linux namespaces; this is {sys.platform}")
        try:
            with open("/proc/filesystems", encoding="ascii") as f:
                if "overlay" not in f.read():
                    raise no("the kernel has no overlayfs (try `modprobe overlay`)")
        except OSError as exc:
            raise no(f"cannot read /proc/filesystems: {exc}") from exc
        for ns in ("mnt", "pid", "net", "uts", "ipc", "cgroup"):
            if not os.path.exists(f"/proc/self/ns/{ns}"):
                raise no(f"the kernel lacks {ns} namespaces")
        if userns.rootless():
            userns.check()  # can this user make a user namespace with an overlay in it?

    def unavailable_for(self, spec: MachineSpec) -> str | None:
        """Why ``spec`` cannot be made here (see :class:`~pytest_vmenv.backend.SpecCheck`).

        Root makes every spec but these: ``disk=`` needs loop devices and mkfs.ext4, from
        :data:`.disk.MIN_SIZE` up; a Debian image that is not built yet needs its builder
        (see :func:`pytest_vmenv.images.builder_problem`) and the host's apt to serve its
        suite; systemd needs a cgroup v2 hierarchy. Unprivileged, ``image="host"``,
        ``network=``, built Debian images and ``init="systemd"`` are refused. Each refusal
        has its own reason (all that apply are given).
        """
        recipe = recipe_of(spec)
        init = spec.init or ("systemd" if recipe else "none")
        reasons = []
        if userns.rootless():
            if is_host(spec.image, spec.image_config):
                reasons.append(userns.HOST_REASON)
            if spec.network is not None:
                reasons.append(userns.NETWORK_REASON)
            if recipe is not None:
                reasons.append(DEBIAN_REASON)
            elif init == "systemd":
                reasons.append(SYSTEMD_REASON)
            return "; and ".join(reasons) or None
        if spec.disk is not None:
            if spec.disk < disk.MIN_SIZE:
                reasons.append(f"disk={spec.disk} is too small: the emulator's smallest disk is 1M")
            elif (problem := disk.unavailable()) is not None:
                reasons.append(problem)
        if recipe is not None:
            try:
                built = ImageCache(self.state_dir).lookup(recipe)
            except errors.ConfigError as exc:
                reasons.append(str(exc))
            else:
                problem = builder_problem() if built is None else None
                if problem is not None:
                    reasons.append(problem)
        cgroups = self._deps(zygote=False)[1]
        if init == "systemd" and (not cgroups.usable() or cgroups.v2_parent is None):
            reasons.append(
                "init='systemd' needs a cgroup v2 hierarchy (cgroup2 at /sys/fs/cgroup or "
                "/sys/fs/cgroup/unified) for the guest's systemd: none is usable here; use "
                "init='none'"
            )
        return "; and ".join(reasons) or None

    @staticmethod
    def _init_of(spec: MachineSpec) -> str:
        """The init a guest of ``spec`` boots: systemd on a built Debian image by default."""
        init = spec.init or ("systemd" if recipe_of(spec) is not None else "none")
        if init == "systemd" and is_host(spec.image, spec.image_config):
            raise errors.ConfigError(
                f"{NAME}: init='systemd' cannot boot image 'host' (a view of the host's own "
                "system); use image='debian-12' or a rootfs with systemd, or init='none'"
            )
        return init

    def restrictions(self) -> str | None:
        """What the emulator cannot make here: as non-root, see :mod:`.userns`."""
        if not userns.rootless():
            return None
        limits = "" if self._delegated() else "; memory and cpus limits are not applied"
        return (
            f"unprivileged, uid {os.geteuid()}: rootfs directory and tarball images only; "
            "image='host' and network= need root, as do Debian images and init='systemd'"
            f"{limits}"
        )

    def _refuse(self, spec: MachineSpec, *, template: bool) -> None:
        """Raise BackendUnavailable for a spec this process cannot make.

        A template is built without a network, so only its image can be refused; a clone is
        refused for anything :meth:`unavailable_for` names.
        """
        shape = replace(spec, network=None) if template else spec
        reason = self.unavailable_for(shape)
        if reason is not None:
            raise errors.BackendUnavailable(NAME, reason)

    @boundary
    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        self.check()
        self._refuse(spec, template=True)
        start = time.monotonic()
        with layers.build_lock(self.emu_dir, key) as final, contextlib.ExitStack() as hold:
            done = layers.load(final)
            if done is not None:
                return done
            recipe = recipe_of(spec)
            if recipe is not None:  # held until the template stacks on it: rm cannot take it
                base = [str(hold.enter_context(ImageCache(self.state_dir).using(recipe)))]
            else:
                base = base_stack(spec.image, spec.image_config, self.emu_dir, self.state_dir)
            check_image(base, spec)
            start = time.monotonic()  # building the image is not part of spec.timeout
            tags = layers.labels(session.id, session.owner, session.reuse)
            if not spec.provision:
                return layers.commit(final, key, spec.name, None, base, "", tags)
            guest = Guest(
                id=f"t{uuid.uuid4().hex[:15]}",
                name=spec.name,
                session=session.id,
                dir=self.emu_dir / "guests" / "",
                stack=base,
                owner=session.owner,
            )
            guest.dir = self.emu_dir / "guests" / guest.id
            self._boot(guest, spec)
            try:
                log = layers.provision(guest, spec, start)
                stop_guest(guest)
                upper = disk.upper_dir(guest.dir)
                return layers.commit(final, key, spec.name, upper, base, log, tags)
            finally:
                self._destroy(guest.id)

    @boundary
    def clone(self, snapshot: Snapshot, spec: MachineSpec, session: Session) -> MachineRef:
        self._refuse(spec, template=False)
        stack = refresh_mask(layers.stack_of(snapshot), self.emu_dir, self.state_dir)
        guest = Guest(
            id=uuid.uuid4().hex[:16],
            name=spec.name,
            session=session.id,
            dir=Path(),
            stack=stack,
            network=spec.network,
            owner=session.owner,
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
        return inventory.ref_of(guest.meta(), guest.dir)

    @boundary
    def execute(
        self,
        ref: MachineRef,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        start = time.monotonic()
        conn = self._guest(ref).conn
        if conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} is stopped")
        left = None if timeout is None else timeout - (time.monotonic() - start)
        try:
            code, out, err = conn.execute(
                argv, input=input, env=env, user=user, timeout=left, max_output=max_output
            )
        except CommandTimedOut:
            raise errors.CommandTimeout(ref.name, list(argv), timeout or 0.0) from None
        return Result.from_output(code, out, err, time.monotonic() - start)

    def _file_request(self, ref: MachineRef, msg: dict[str, Any], fd: int) -> dict[str, Any]:
        conn = self._guest(ref).conn
        if conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} is stopped")
        try:
            reply = conn.transfer(msg, fd)
        except TimeoutError as exc:
            raise errors.BackendError(
                f"{NAME}: {msg['op']} {msg['path']!r} on {ref.name!r} made no progress for "
                f"{FILE_IDLE_TIMEOUT:g}s; gave up"
            ) from exc
        if reply.get("errno") == errno.EFBIG and "size" in reply:
            raise TooLarge(int(reply["size"]))
        if "error" in reply:
            raise errors.BackendError(
                f"{NAME}: {msg['op']} {msg['path']!r} on {ref.name!r} failed: {reply['error']}"
            )
        return reply

    @boundary
    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        src = Path(src)
        if src.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_in {src}: is a directory; only files "
                "can be copied (pack it with tar first)"
            )
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            msg = {"op": "put", "path": dst, "mode": st.st_mode & 0o7777, "size": st.st_size}
            self._file_request(ref, msg, fd)
        finally:
            os.close(fd)

    @boundary
    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        """Copy ``src`` out of the guest; its holes stay holes, over ``max_size`` is refused."""
        dst = Path(dst)
        if dst.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_out to {dst}: is a directory; give the file's path"
            )
        existed = dst.exists()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        msg = {"op": "get", "path": src, "extents": True, "max": max_size}
        try:
            try:
                self._file_request(ref, msg, fd)
            except TooLarge as exc:
                assert max_size is not None
                raise errors.FileTooLarge(ref.name, src, exc.size, max_size) from None
        except BaseException:
            os.close(fd)
            fd = -1
            if not existed:
                dst.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    @boundary
    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        guest = self._own(ref, "snapshot")
        tags = layers.labels(guest.session, guest.owner)
        snap = layers.live_snapshot(guest, name, self.emu_dir, tags)
        guest.snapshots.append(snap.handle)
        guest.save()
        return snap

    @boundary
    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        guest = self._own(ref, "revert")
        stack = refresh_mask(layers.stack_of(snapshot), self.emu_dir, self.state_dir)
        zygote, cgroups = self._spawner()
        self._net.detach(guest)
        stop_guest(guest)
        guest.stack = stack
        try:
            problems = start_guest(
                guest,
                zygote,
                cgroups,
                self.emu_dir / "layers",
                guest.memory,
                guest.cpus,
                60.0,
                self.pids_max,
            )
            if guest.init == "systemd":
                wait_systemd(guest, 60.0)
        except BaseException:
            self._destroy(guest.id)
            raise
        self._warn(problems)
        if guest.network is not None:
            self._net.attach(guest, self._guests_snapshot(), self.state_dir)
        if guest.kept:
            self._keep(guest, zygote)

    def console_log(self, ref: MachineRef) -> str:
        if not self._valid_id(ref.id):
            return ""
        with self._lock:
            guest = self._guests.get(ref.id) or self._attached.get(ref.id)
        if guest is None and read_meta(self.emu_dir / "guests" / ref.id) is not None:
            guest = Guest(ref.id, ref.name, ref.session, self.emu_dir / "guests" / ref.id, [])
        return self._console(guest) if guest is not None else ""

    @boundary
    def keep(self, ref: MachineRef) -> None:
        """Let the guest outlive this process until ``destroy`` (from any process).

        PID 1 is told to stay when its primary socket closes, and the zygote to spare its
        keeper when this process goes; ``meta.json`` records ``kept``. Keeping a guest that
        is already kept is a no-op; keeping another process's guest is refused.
        """
        self._check_id(ref.id)
        meta = read_meta(self.emu_dir / "guests" / ref.id)
        if meta is not None and meta.get("kept"):
            return
        guest = self._own(ref, "keep")
        zygote, _cgroups = self._spawner()
        self._keep(guest, zygote)

    def _keep(self, guest: Guest, zygote: Zygote) -> None:
        assert guest.conn is not None
        reply = guest.conn.request({"op": "keep"})
        if "error" in reply:
            raise errors.BackendError(f"{NAME}: keep {guest.name!r} failed: {reply['error']}")
        zygote.keep(guest.keeper)
        guest.kept = True
        guest.save()

    @boundary
    def shell(self, ref: MachineRef, argv: Sequence[str] | None = None) -> int:
        """An interactive shell in the guest on this process's terminal; its exit code.

        Works on our guests and, through ``ctl.sock``, on any other live or kept one (that is
        ``vmenv shell NAME``). ``argv`` None is root's login shell from the guest's
        ``/etc/passwd`` (``/bin/sh -l`` if it has none). stdin/stdout are fds 0 and 1; a
        terminal stdin is put in raw mode while the shell runs.
        """
        conn = self._guest(ref).conn
        if conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} is stopped")
        env = {"TERM": os.environ.get("TERM") or "xterm"}
        return run_shell(conn, argv, env)

    @boundary
    def destroy(self, ref: MachineRef) -> None:
        self._destroy(ref.id)

    def _destroy(self, gid: str) -> None:
        """Remove a guest of this or any other process; already gone is success.

        Kills by recorded cgroups and verified pids (see :func:`.host.stop_guest`), removes
        its cgroups, the snapshot layers it made (unless another guest on disk stacks on
        one) and its dir. A failure to kill leaves the dir (and meta) for a retry.
        """
        self._check_id(gid)
        with self._lock:
            guest = self._guests.pop(gid, None)
            attached = self._attached.pop(gid, None)
        gdir = self.emu_dir / "guests" / gid
        if guest is None:
            meta = read_meta(gdir)
            if meta is None and not gdir.exists():
                if attached is not None and attached.conn is not None:
                    attached.conn.close()
                return
            _zygote, cgroups = self._deps(zygote=False)
            guest = guest_from_meta(gid, gdir, meta or {}, cgroups)
            guest.conn = attached.conn if attached is not None else None
        self._net.detach(guest)
        stop_guest(guest)
        in_use = inventory.stacks_in_use(self.emu_dir / "guests", exclude=gid)
        in_use |= {s for g in self._guests_snapshot() for s in g.stack}
        for handle in guest.snapshots:
            if not any(handle in s for s in in_use):
                layers.remove(Path(handle), self.emu_dir)
        disk.detach(gdir)
        userns.rmtree(gdir)

    @boundary
    def remove_template(self, snapshot: Snapshot) -> None:
        """Remove a template or snapshot layer, unless a machine on disk still needs it.

        A guest (kept, running or dead) that stacks on the layer, directly or through a
        snapshot, or whose snapshot it is, keeps it: TemplateInUse names that machine (see
        :func:`.caches.held_by`, the rule ``vmenv images rm`` applies too). Its build lock
        file goes too, unless a build runs now (:func:`.caches.prune_build_locks`).
        """
        layer = Path(snapshot.handle)
        holder = caches.held_by(self.emu_dir, layer)
        if holder:
            raise errors.TemplateInUse(
                f"{NAME}: template {snapshot.key or layer.name} left in place: {holder}", holder
            )
        layers.remove(layer, self.emu_dir)
        caches.prune_build_locks(self.emu_dir)

    def templates(self) -> list[Snapshot]:
        """Every template and snapshot layer (torn builds included), with its labels.

        ``data`` holds ``session``, ``owner`` (token), ``created`` (epoch), ``reuse``,
        ``complete`` and ``layers``; :meth:`remove_template` removes any of them, from any
        process. Shared base layers (the host mask) are not listed.
        """
        return layers.listing(self.emu_dir / "layers")

    def caches(self, live_sessions: Collection[str]) -> list[Cache]:
        """Templates, snapshots, torn builds, host masks and unpacked tarball images, each
        with its size and whether something live holds it (see :mod:`.caches`)."""
        return caches.listing(self.emu_dir, live_sessions)

    @boundary
    def remove_cache(self, cache: Cache, live_sessions: Collection[str]) -> None:
        caches.remove(self.emu_dir, cache, live_sessions)

    def owned(self, session: str | None = None) -> Iterable[MachineRef]:
        """Guests on disk (of ``session`` only, if given), live, kept, half-created or dead.

        ``data["state"]`` is ``creating`` (no PID 1 yet), ``running``, ``kept`` or ``gone``
        (its processes died with their creator; only the dir and cgroups are left).
        """
        return inventory.refs(self.emu_dir / "guests", session)

    def close(self) -> None:
        """Destroy every guest this instance made, except kept ones, and hang up the zygote."""
        for guest in self._guests_snapshot():
            if guest.kept:
                with self._lock:
                    self._guests.pop(guest.id, None)
                if guest.conn is not None:
                    guest.conn.close()
                continue
            try:
                self._destroy(guest.id)
            except Exception as exc:  # noqa: BLE001 - keep releasing the rest
                warnings.warn(
                    f"emulator: could not destroy {guest.name!r}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        with self._lock:
            attached, self._attached = list(self._attached.values()), {}
        for guest in attached:
            if guest.conn is not None:
                guest.conn.close()
        self._net.close()
        with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()
