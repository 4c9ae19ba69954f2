"""The guests one backend instance knows: the ones it made, and others' it talks to.

Every verb finds its guest here (:meth:`Guests.find`): one this instance made, or one of
another process (kept or live), attached through its ``ctl.sock`` on first use. What only a
guest's creator may do (snapshot, revert, keep) goes through :meth:`Guests.own`.
"""

from __future__ import annotations

import os
import re
import threading

from ... import errors
from ...backend import MachineRef
from .control import Conn, connect
from .record import Guest, guest_from_meta, read_meta
from .state import NAME, State

__all__ = ["Guests", "console_text", "valid_id"]

_GUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def valid_id(gid: str) -> bool:
    """Whether ``gid`` is a machine id this backend makes (it names a directory)."""
    return isinstance(gid, str) and _GUEST_ID.fullmatch(gid) is not None


def check_id(gid: str) -> None:
    """Refuse a machine id that is not one this backend makes."""
    if not valid_id(gid):
        raise errors.BackendError(f"{NAME}: invalid machine id {gid!r}")


def _missing(ref: MachineRef) -> errors.MachineGone:
    return errors.MachineGone(f"{NAME}: machine {ref.name!r} ({ref.id}) does not exist")


def console_text(guest: Guest) -> str:
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


class Guests:
    """Our guests and the attached ones, by id; thread-safe."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._ours: dict[str, Guest] = {}
        self._attached: dict[str, Guest] = {}  # other processes' guests we talk to

    def add(self, guest: Guest) -> None:
        with self._lock:
            self._ours[guest.id] = guest

    def ours(self) -> list[Guest]:
        with self._lock:
            return list(self._ours.values())

    def known(self, gid: str) -> Guest | None:
        """Ours or attached, without connecting to anything."""
        with self._lock:
            return self._ours.get(gid) or self._attached.get(gid)

    def pop(self, gid: str) -> tuple[Guest | None, Guest | None]:
        """Forget ``gid``: (ours, attached), either None."""
        with self._lock:
            return self._ours.pop(gid, None), self._attached.pop(gid, None)

    def find(self, ref: MachineRef) -> Guest:
        """Our guest, or another process's (kept or live) reached through its ``ctl.sock``."""
        guest = self.known(ref.id)
        if guest is None:
            check_id(ref.id)
            guest = self._attach(ref)
        if guest.conn is None:
            raise _missing(ref)
        return guest

    def conn(self, ref: MachineRef) -> Conn:
        """The control connection of ``ref``'s guest (see :meth:`find`)."""
        conn = self.find(ref).conn
        if conn is None:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} is stopped")
        return conn

    def _attach(self, ref: MachineRef) -> Guest:
        gdir = self.state.guests_dir / ref.id
        meta = read_meta(gdir)
        if meta is None:
            raise _missing(ref)
        guest = guest_from_meta(ref.id, gdir, meta, self.state.cgroups)
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

    def own(self, ref: MachineRef, what: str) -> Guest:
        """A guest this instance created (snapshot/revert/keep change it: creator only)."""
        check_id(ref.id)
        with self._lock:
            guest = self._ours.get(ref.id)
        if guest is not None and guest.conn is not None:
            return guest
        if guest is None and read_meta(self.state.guests_dir / ref.id) is not None:
            raise errors.BackendError(
                f"{NAME}: {what} of {ref.name!r} ({ref.id}): only the process that created "
                "a machine can do that"
            )
        raise _missing(ref)

    def let_go(self, guest: Guest) -> None:
        """Stop holding our kept ``guest`` (it lives on); close our connection to it."""
        with self._lock:
            self._ours.pop(guest.id, None)
        if guest.conn is not None:
            guest.conn.close()

    def detach_all(self) -> None:
        """Close every connection to other processes' guests."""
        with self._lock:
            attached, self._attached = list(self._attached.values()), {}
        for guest in attached:
            if guest.conn is not None:
                guest.conn.close()
