"""Machines: booting, cloning, reverting, keeping and destroying guests.

A clone is a new guest over a template's layer stack (:mod:`.layers`); a revert restarts the
guest's processes on a snapshot's files (``live_snapshot`` is False). Everything is labelled
on disk (see :mod:`.record`), so :meth:`Machines.destroy` works on a guest of any process:
it kills by the recorded cgroups and verified pids (:func:`.lifecycle.stop_guest`).
"""

from __future__ import annotations

import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ... import errors
from ...backend import MachineRef, Network, Session, Snapshot
from . import disk, inventory, layers, support, userns
from .guests import Guests, check_id, console_text
from .hostmask import refresh_mask
from .lifecycle import start_guest, stop_guest, wait_systemd
from .networks import Networks
from .record import Guest, guest_from_meta, read_meta
from .state import NAME, State

if TYPE_CHECKING:
    from ...spec import MachineSpec

__all__ = ["Machines"]

REVERT_TIMEOUT = 60.0
"""Seconds a reverted guest has to boot again (its spec's timeout is not known then)."""


class Machines:
    """The guests' lifecycle for one backend instance; thread-safe."""

    def __init__(self, state: State, guests: Guests, networks: Networks) -> None:
        self.state = state
        self.guests = guests
        self.networks = networks

    def new_guest(
        self,
        gid: str,
        spec: MachineSpec,
        session: Session,
        stack: list[str],
        network: Network | None = None,
    ) -> Guest:
        return Guest(
            id=gid,
            name=spec.name,
            session=session.id,
            dir=self.state.guests_dir / gid,
            stack=stack,
            network=network,
            owner=session.owner,
        )

    def boot(self, guest: Guest, spec: MachineSpec) -> None:
        """Start ``guest`` for ``spec`` and wait until it is up (BootTimeout with its console
        tail if not within ``spec.timeout``, at most 60 s); a failed boot is destroyed."""
        support.warn_unfiltered()
        guest.memory, guest.cpus, guest.disk = spec.memory, spec.cpus, spec.disk
        guest.init = support.init_of(spec)
        self.guests.add(guest)
        timeout = min(spec.timeout, 60.0)
        try:
            problems = self._start(guest, timeout)
        except TimeoutError as exc:
            tail = console_text(guest)
            self.destroy(guest.id)
            raise errors.BootTimeout(f"{NAME}: {exc}", tail) from exc
        except BaseException:
            self.destroy(guest.id)
            raise
        support.warn_limits(problems)

    def _start(
        self, guest: Guest, timeout: float, systemd_timeout: float | None = None
    ) -> list[str]:
        """Start ``guest`` within ``timeout``; its systemd gets what is left of it, or
        ``systemd_timeout``."""
        started = time.monotonic()
        state = self.state
        problems = start_guest(
            guest,
            state.zygote,
            state.cgroups,
            state.emu_dir / "layers",
            guest.memory,
            guest.cpus,
            timeout,
            state.pids_max,
        )
        if guest.init == "systemd":
            left = timeout - (time.monotonic() - started)
            wait_systemd(guest, left if systemd_timeout is None else systemd_timeout)
        return problems

    def clone(
        self, snapshot: Snapshot, spec: MachineSpec, session: Session, network: Network | None
    ) -> MachineRef:
        support.refuse(self.state, spec, template=False)
        stack = refresh_mask(layers.stack_of(snapshot), self.state.emu_dir, self.state.state_dir)
        guest = self.new_guest(uuid.uuid4().hex[:16], spec, session, stack, network)
        self.boot(guest, spec)
        if network is not None:
            try:
                self.networks.attach(guest, self.guests.ours(), self.state.state_dir)
            except BaseException:
                self.destroy(guest.id)
                raise
        return inventory.ref_of(guest.meta(), guest.dir)

    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        guest = self.guests.own(ref, "snapshot")
        tags = layers.labels(guest.session, guest.owner)
        snap = layers.live_snapshot(guest, name, self.state.emu_dir, tags)
        guest.snapshots.append(snap.handle)
        guest.save()
        return snap

    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        guest = self.guests.own(ref, "revert")
        state = self.state
        stack = refresh_mask(layers.stack_of(snapshot), state.emu_dir, state.state_dir)
        self.networks.detach(guest)
        stop_guest(guest)
        guest.stack = stack
        try:
            problems = self._start(guest, REVERT_TIMEOUT, REVERT_TIMEOUT)
        except BaseException:
            self.destroy(guest.id)
            raise
        support.warn_limits(problems)
        if guest.network is not None:
            self.networks.attach(guest, self.guests.ours(), state.state_dir)
        if guest.kept:
            self._keep(guest)

    def keep(self, ref: MachineRef) -> None:
        """Let the guest outlive this process until ``destroy`` (from any process).

        PID 1 is told to stay when its primary socket closes, and the zygote to spare its
        keeper when this process goes; ``meta.json`` records ``kept``. Keeping a guest that
        is already kept is a no-op; keeping another process's guest is refused.
        """
        check_id(ref.id)
        meta = read_meta(self.state.guests_dir / ref.id)
        if meta is not None and meta.get("kept"):
            return
        self._keep(self.guests.own(ref, "keep"))

    def _keep(self, guest: Guest) -> None:
        assert guest.conn is not None
        reply = guest.conn.request({"op": "keep"})
        if "error" in reply:
            raise errors.BackendError(f"{NAME}: keep {guest.name!r} failed: {reply['error']}")
        self.state.zygote.keep(guest.keeper)
        guest.kept = True
        guest.save()

    def console_log(self, ref: MachineRef) -> str:
        guest = self.guests.known(ref.id)
        if guest is None and read_meta(self.state.guests_dir / ref.id) is not None:
            guest = Guest(ref.id, ref.name, ref.session, self.state.guests_dir / ref.id, [])
        return console_text(guest) if guest is not None else ""

    def destroy(self, gid: str) -> None:
        """Remove a guest of this or any other process; already gone is success.

        Kills by recorded cgroups and verified pids (see :func:`.lifecycle.stop_guest`),
        removes its cgroups, the snapshot layers it made (unless another guest on disk
        stacks on one) and its dir. A failure to kill leaves the dir (and meta) for a retry.
        """
        check_id(gid)
        guest, attached = self.guests.pop(gid)
        gdir = self.state.guests_dir / gid
        if guest is None:
            meta = read_meta(gdir)
            if meta is None and not gdir.exists():
                if attached is not None and attached.conn is not None:
                    attached.conn.close()
                return
            guest = guest_from_meta(gid, gdir, meta or {}, self.state.cgroups)
            guest.conn = attached.conn if attached is not None else None
        self.networks.detach(guest)
        stop_guest(guest)
        self._remove_snapshots(guest)
        disk.detach(gdir)
        userns.rmtree(gdir)

    def _remove_snapshots(self, guest: Guest) -> None:
        """The snapshot layers ``guest`` made that no other guest (on disk or ours) uses."""
        in_use = inventory.stacks_in_use(self.state.guests_dir, exclude=guest.id)
        in_use |= {s for g in self.guests.ours() for s in g.stack}
        for handle in guest.snapshots:
            if not any(handle in s for s in in_use):
                layers.remove(Path(handle), self.state.emu_dir)

    def close(self) -> None:
        """Destroy every guest this instance made, except kept ones (let go of those)."""
        for guest in self.guests.ours():
            if guest.kept:
                self.guests.let_go(guest)
                continue
            try:
                self.destroy(guest.id)
            except Exception as exc:  # noqa: BLE001 - keep releasing the rest
                warnings.warn(
                    f"emulator: could not destroy {guest.name!r}: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.guests.detach_all()
        self.networks.close()
