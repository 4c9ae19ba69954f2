"""LibvirtBackend: real QEMU guests through libvirt, linked qcow2 clones, RAM-state clones.

The backend is the protocol's face over parts that each do one thing (see :mod:`.parts`):
templates are built and removed by :mod:`.templates`, machines cloned, kept and destroyed by
:mod:`.machines`, snapshots taken and reverted by :mod:`.snapshots`, commands and files go
through the channel a machine's template recorded (:mod:`.channels`: the guest agent, or SSH
to the clone's DHCP-lease address for images without one), and :mod:`.inventory` finds every
domain of ours from its labels, and :mod:`.stored` lists and removes the built images for
``vmenv images`` (with the templates, as a ``CacheKeeper``). Every protocol method maps
foreign exceptions at the one boundary, :data:`.faults.BOUNDARY`.

Every method that takes a :class:`MachineRef` works from any process on a ref from
:meth:`LibvirtBackend.owned`, by the labels in the domain's ``<metadata>``: that is how
``vmenv gc`` and the crash sweeper remove what dead sessions left.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_vmenv.backend import (
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
from pytest_vmenv.caches import template_caches
from pytest_vmenv.images import BASES, Recipe

from . import stored
from .config import LibvirtConfig
from .connection import NAME
from .debian import ensure_debian
from .faults import BOUNDARY
from .forwards import Forwards
from .machines import Machines
from .parts import Parts
from .snapshots import Snapshots
from .templates import Templates

if TYPE_CHECKING:
    from pytest_vmenv.spec import MachineSpec

__all__ = ["LibvirtBackend"]


class LibvirtBackend:
    """The ``libvirt`` (alias ``kvm``) backend; see the module docstring. Thread-safe.

    Options (``[tool.vmenv.backends.libvirt]``, see :mod:`.config`): ``uri`` (a string or a
    list: the scale-out path), ``accel`` (``auto``/``kvm``/``tcg``), ``ram_state`` (the
    RAM-state fast path, default true), ``domain_xml`` (your own Jinja2 domain template),
    ``state_dir``.
    """

    name = NAME
    builtin_images: tuple[str, ...] = ("tiny", *BASES)

    def __init__(
        self, options: Mapping[str, Any] | None = None, state_dir: Path | None = None
    ) -> None:
        self.options = dict(options or {})
        self.parts = Parts.of(LibvirtConfig.load(self.options, state_dir))
        self.hv = self.parts.hv
        self.uris = list(self.parts.config.uris)
        self._templates = Templates(self.parts)
        self._machines = Machines(self.parts)
        self._snapshots = Snapshots(self.parts)
        self._forwards = Forwards(self.hv)

    # -- protocol -----------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities(live_snapshot=True, network=True, limits=True, console_log=True)

    def check(self) -> None:
        self.hv.check()

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
        return self.parts.channels.execute(
            ref, argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
        )

    @BOUNDARY
    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        self.parts.channels.copy_in(ref, src, dst)

    @BOUNDARY
    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        self.parts.channels.copy_out(ref, src, dst, max_size=max_size)

    @BOUNDARY
    def snapshot(self, ref: MachineRef, name: str) -> Snapshot:
        return self._snapshots.take(ref, name)

    @BOUNDARY
    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        self._snapshots.revert(ref, snapshot)

    def console_log(self, ref: MachineRef) -> str:
        return self.parts.paths.console_tail(ref.id, 256 * 1024)

    @BOUNDARY
    def destroy(self, ref: MachineRef) -> None:
        self._forwards.forget(ref.id)
        self._machines.destroy(ref)

    @BOUNDARY
    def keep(self, ref: MachineRef) -> None:
        """Mark the machine kept (its domain is persistent: it outlives us anyway)."""
        self._machines.keep(ref)

    @BOUNDARY
    def remove_template(self, snapshot: Snapshot) -> None:
        """Delete the template's disks and record, unless a clone (a kept one, say) is still
        built on it: TemplateInUse names it, and the disks stay as its backing file."""
        self._templates.remove(snapshot)

    @BOUNDARY
    def owned(self, session_id: str | None = None) -> Iterable[MachineRef]:
        """Every domain with our labels (of ``session_id`` only, if given), any role or state."""
        return self.parts.inventory.owned(session_id)

    # -- optional protocols -------------------------------------------------------------------
    @BOUNDARY
    def forward(self, ref: MachineRef, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """QEMU user-mode ``hostfwd`` on ``host`` to the guest's ``10.0.2.15:port`` (see
        :mod:`.forwards`): a service bound only to the guest's ``127.0.0.1`` is not reached."""
        return self._forwards.forward(ref, port, host)

    @BOUNDARY
    def templates(self) -> list[Snapshot]:
        """Every template record, of any session, with its ``session``/``owner``/``created``."""
        return self.parts.records.listed()

    @BOUNDARY
    def caches(self, live_sessions: Collection[str]) -> list[Cache]:
        """Its templates (as the core lists any backend's) and its built images, each with
        what holds it (see :mod:`.stored`); read from the state dir, without libvirtd."""
        snaps = self.parts.records.listed()
        records = [snap.data for snap in snaps]
        found = template_caches(self, snaps, live_sessions)
        return found + stored.listing(self.parts.paths.images, records, self.parts.paths.state_dir)

    @BOUNDARY
    def remove_cache(self, cache: Cache, live_sessions: Collection[str]) -> None:
        """Remove a template (:meth:`remove_template`) or a built image (:func:`.stored.remove`:
        never one being built or built on, nor one a template is built on)."""
        if isinstance(cache.handle, Snapshot):
            self._templates.remove(cache.handle)
        else:
            records = [t.data for t in self.parts.records.listed()]
            stored.remove(self.parts.paths.images, cache, records, self.parts.paths.state_dir)

    @BOUNDARY
    def build_image(self, recipe: Recipe) -> tuple[str, Path]:
        """The qcow2 image of ``recipe`` as this backend boots it (:func:`.debian.ensure_debian`),
        built now unless it is here: (its id in ``vmenv images``, its disk)."""
        image = ensure_debian(self.parts.paths.state_dir, self.parts.paths.images, recipe)
        return image.dir.name, image.disk

    @BOUNDARY
    def shell(self, ref: MachineRef, argv: Sequence[str] | None = None, /) -> int:
        """Run ``argv`` (none: an ``id; uname -a`` report) and print its output.

        The agent has no terminal, so this is a command runner, not an interactive shell.
        """
        result = self.execute(ref, list(argv or ["/bin/sh", "-c", "id; uname -a"]))
        print(result.stdout, end="")
        print(result.stderr, end="")
        return result.exit_code

    def summary(self) -> list[str]:
        """Lines for a terminal summary: which accelerator and why."""
        return self.parts.accel.summary()

    def close(self) -> None:
        """Close the connections (machines are destroyed by the orchestrator, not here)."""
        self.parts.channels.close()
        self.hv.close()
