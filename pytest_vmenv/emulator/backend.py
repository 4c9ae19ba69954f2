"""EmulatorBackend: the built-in backend, Linux namespaces + overlayfs + cgroups.

One guest is a PID 1 in its own mount, UTS, IPC, network, PID and cgroup namespaces on an
overlay root (see :mod:`.guest.mounts`), forked by the zygote (:mod:`.zygote`) and driven
over a control socket (:mod:`.host.control`, :mod:`.guest.pid1`). Templates and snapshots
are read-only overlay layers under ``<state>/emulator/layers``; a clone is a new upper dir
over a layer stack (:mod:`.host.layers`). ``live_snapshot`` is False: a revert restarts the
guest's processes on the snapshot's files.

Everything is labelled on disk (guest ``meta.json``, layer ``meta.json``: session, owner
token, created), and every method that takes a :class:`MachineRef` also works from another
process on a ref from :meth:`EmulatorBackend.owned`: ``destroy`` kills by the recorded
cgroups and verified pids, the verbs (``execute``, ``copy_in``, ``copy_out``, ``shell``)
connect to the guest's ``ctl.sock``. That is what ``vmenv gc``, ``vmenv shell`` and the crash
sweeper rely on.

The class is one object to the outside, made of parts: :class:`.host.state.State` (options,
dirs, zygote, cgroup probe), :class:`.host.guests.Guests` (the guests it knows),
:class:`.host.machines.Machines` (their lifecycle), :class:`.host.templates.Templates`,
:class:`.host.channel.Channel` (commands and files), :class:`.host.networks.Networks` and
:mod:`.host.support` (what this host can make). :data:`BOUNDARY` maps the foreign exceptions
of every protocol method into :mod:`pytest_vmenv.errors`.

Run unprivileged, guests live in a user namespace (see :mod:`.host.userns`): rootfs-directory
and tarball images work; ``image="host"`` and ``network=`` are refused: :meth:`unavailable_for`
says why for each spec (the orchestrator asks before it uses one), and ``build_template``/
``clone`` raise ``BackendUnavailable`` with the same reason. ``memory``/``cpus`` are not
applied (``LimitNotApplied``, once).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..backend import (
    GET_LIMIT,
    OUTPUT_LIMIT,
    Cache,
    Capabilities,
    MachineRef,
    Network,
    Result,
    Session,
    Snapshot,
)
from ..images import BASES
from .host import caches, inventory, layers, support
from .host.channel import Channel
from .host.control import GuestDied
from .host.forward import Forwards
from .host.guests import Guests, valid_id
from .host.machines import Machines
from .host.networks import Networks
from .host.record import Guest
from .host.spawner import ZygoteGone
from .host.state import NAME, State
from .host.support import LimitNotApplied
from .host.templates import Templates

if TYPE_CHECKING:
    from ..spec import MachineSpec

__all__ = ["BOUNDARY", "EmulatorBackend", "LimitNotApplied"]


def _gone(exc: BaseException, call: errors.Call) -> errors.VmenvError:
    what = f"{call.machine} is gone" if call.ref else "the guest is gone"
    detail = (exc.strerror if isinstance(exc, OSError) else None) or exc
    return errors.MachineGone(
        f"{NAME}: {what}: {detail} (its PID 1 was killed or crashed, or the zygote that "
        "forked it died); destroy() removes what is left"
    )


BOUNDARY = errors.Boundary(NAME, [((GuestDied, ZygoteGone), _gone), (OSError, errors.failed())])
"""The emulator's one exception boundary: a guest or zygote that hung up is MachineGone,
any other OSError a BackendError naming the method; our own bugs pass unchanged."""


class EmulatorBackend:
    """The ``emulator`` backend (see the module docstring); thread-safe."""

    name = NAME
    builtin_images: tuple[str, ...] = ("host", *BASES)

    def __init__(
        self, options: Mapping[str, Any] | None = None, state_dir: Path | None = None
    ) -> None:
        self._state = State(options, state_dir)
        guests = Guests(self._state)
        self._networks = Networks()
        self._machines = Machines(self._state, guests, self._networks)
        self._templates = Templates(self._machines)
        self._channel = Channel(guests)
        self._forwards = Forwards()

    @property
    def options(self) -> dict[str, Any]:
        return self._state.options

    @property
    def state_dir(self) -> Path:
        return self._state.state_dir

    @property
    def emu_dir(self) -> Path:
        """``<state>/emulator`` (0700; see :attr:`.host.state.State.emu_dir`)."""
        return self._state.emu_dir

    @property
    def pids_max(self) -> int | None:
        """A guest's process limit (see :attr:`.host.state.State.pids_max`)."""
        return self._state.pids_max

    @property
    def zygote_pid(self) -> int | None:
        """The pid of this instance's zygote process (None until the first guest)."""
        return self._state.zygote_pid

    # -- what this host can make -----------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return support.capabilities(self._networks.available())

    def check(self) -> None:
        support.check()

    def unavailable_for(self, spec: MachineSpec) -> str | None:
        """Why ``spec`` cannot be made here (see :func:`.host.support.unavailable_for`)."""
        return support.unavailable_for(self._state, spec)

    def restrictions(self) -> str | None:
        """What the emulator cannot make here: as non-root, see :mod:`.host.userns`."""
        return support.restrictions(self._state)

    # -- templates and machines ------------------------------------------------------------
    @BOUNDARY
    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        return self._templates.build(spec, key, session)

    @BOUNDARY
    def clone(
        self,
        snapshot: Snapshot,
        spec: MachineSpec,
        session: Session,
        network: Network | None = None,
    ) -> MachineRef:
        return self._machines.clone(snapshot, spec, session, network)

    @BOUNDARY
    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        return self._machines.snapshot(ref, name)

    @BOUNDARY
    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        """Restart the guest on ``snapshot``'s files; its exposed host ports listen again in
        its new network namespace (see :meth:`.host.forward.Forwards.reopen`)."""
        try:
            self._machines.revert(ref, snapshot)
        except BaseException:
            if self._machines.guests.known(ref.id) is None:
                self._forwards.close(ref.id)  # the failed revert destroyed it
            raise
        self._forwards.reopen(ref.id, self._current(ref))

    def console_log(self, ref: MachineRef) -> str:
        return self._machines.console_log(ref) if valid_id(ref.id) else ""

    @BOUNDARY
    def keep(self, ref: MachineRef) -> None:
        """Let the guest outlive this process until ``destroy`` (see
        :meth:`.host.machines.Machines.keep`)."""
        self._machines.keep(ref)

    @BOUNDARY
    def destroy(self, ref: MachineRef) -> None:
        self._forwards.close(ref.id)
        self._machines.destroy(ref.id)

    @BOUNDARY
    def remove_template(self, snapshot: Snapshot) -> None:
        """Remove a template or snapshot layer unless a machine on disk still needs it (see
        :meth:`.host.templates.Templates.remove`)."""
        self._templates.remove(snapshot)

    def templates(self) -> list[Snapshot]:
        """Every template and snapshot layer (torn builds included), with its labels.

        ``data`` holds ``layers``; :meth:`remove_template` removes any of them, from any
        process. Shared base layers (the host mask) are not listed.
        """
        return layers.listing(self.emu_dir / "layers")

    def caches(self, live_sessions: Collection[str]) -> list[Cache]:
        """Templates, snapshots, torn builds, host masks and unpacked tarball images, each
        with its size and whether something live holds it (see :mod:`.host.caches`)."""
        return caches.listing(self.emu_dir, live_sessions)

    @BOUNDARY
    def remove_cache(self, cache: Cache, live_sessions: Collection[str]) -> None:
        caches.remove(self.emu_dir, cache, live_sessions)

    def owned(self, session_id: str | None = None) -> Iterable[MachineRef]:
        """Guests on disk (of ``session_id`` only, if given), live, kept, half-created or dead.

        ``data["state"]`` is ``creating`` (no PID 1 yet), ``running``, ``kept`` or ``gone``
        (its processes died with their creator; only the dir and cgroups are left).
        """
        return inventory.refs(self.emu_dir / "guests", session_id)

    def close(self) -> None:
        """Close every forward, destroy every guest this instance made, except kept ones, and
        hang up the zygote."""
        self._forwards.close_all()
        self._machines.close()
        self._state.close()

    # -- the command channel ---------------------------------------------------------------
    @BOUNDARY
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
        return self._channel.execute(
            ref, argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
        )

    @BOUNDARY
    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        self._channel.copy_in(ref, src, dst)

    @BOUNDARY
    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        """Copy ``src`` out of the guest; its holes stay holes, over ``max_size`` is refused."""
        self._channel.copy_out(ref, src, dst, max_size=max_size)

    @BOUNDARY
    def shell(self, ref: MachineRef, argv: Sequence[str] | None = None) -> int:
        """An interactive shell in the guest on this process's terminal; its exit code.

        Works on our guests and, through ``ctl.sock``, on any other live or kept one (that is
        ``vmenv shell NAME``); see :meth:`.host.channel.Channel.shell`.
        """
        return self._channel.shell(ref, argv)

    @BOUNDARY
    def forward(self, ref: MachineRef, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """A listener on ``host`` relayed to ``127.0.0.1:port`` inside the guest's network
        namespace, until the machine is destroyed or the backend closes (see
        :mod:`.host.forward`: it lives in this process and dies with it)."""
        return self._forwards.forward(ref.id, port, host, self._current(ref))

    @BOUNDARY
    def expose_host_port(self, ref: MachineRef, port: int) -> tuple[str, int]:
        """``127.0.0.1`` and a port on the guest's own loopback (``port`` itself when free
        there) relayed to ``127.0.0.1:port`` on the host, until the machine is destroyed or
        the backend closes (see :mod:`.host.forward`). The guest's loopback is there with or
        without ``network=``, and only the guest's processes reach it; nothing else of the
        host is reachable through it."""
        return self._forwards.expose(ref.id, port, self._current(ref))

    def _current(self, ref: MachineRef) -> Callable[[], Guest]:
        """A function giving the guest's current record, raising once it is destroyed."""
        guests = self._machines.guests
        guests.find(ref)
        gid, name = ref.id, ref.name

        def current() -> Guest:
            guest = guests.known(gid)
            if guest is None:
                raise errors.MachineGone(f"{NAME}: machine {name!r} ({gid}) is destroyed")
            return guest

        return current
