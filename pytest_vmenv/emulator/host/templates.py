"""Templates: a guest booted from an image, provisioned, and frozen into a read-only layer.

One build per key at a time, across threads and processes (:func:`.layers.build_lock`); a
complete layer of the key is returned as it is (that is how xdist workers and ``--vm-reuse``
share templates). A template without provision steps is its image's stack, booted by nothing.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ... import errors
from ...backend import Session, Snapshot
from ...images import ImageCache, recipe_of
from . import caches, disk, layers, support
from .imagecheck import check_image
from .images import base_stack
from .lifecycle import stop_guest
from .machines import Machines
from .record import Guest
from .state import NAME

if TYPE_CHECKING:
    from ...spec import MachineSpec

__all__ = ["Templates"]


class Templates:
    """Building and removing the templates of one backend instance (over its machines)."""

    def __init__(self, machines: Machines) -> None:
        self.machines = machines
        self.state = machines.state

    def _base(self, spec: MachineSpec, hold: contextlib.ExitStack) -> list[str]:
        """The image's stack; a built image is held until the template stacks on it (so
        that ``vmenv images rm`` cannot take it meanwhile)."""
        recipe = recipe_of(spec)
        if recipe is not None:
            return [str(hold.enter_context(ImageCache(self.state.state_dir).using(recipe)))]
        return base_stack(spec.image, spec.image_config, self.state.emu_dir, self.state.state_dir)

    def build(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        """Boot ``spec``'s image, run its provision steps and freeze the result (see module)."""
        support.check()
        state = self.state
        support.refuse(state, spec, template=True)
        with layers.build_lock(state.emu_dir, key) as final, contextlib.ExitStack() as hold:
            done = layers.load(final)
            if done is not None:
                return done
            base = self._base(spec, hold)
            check_image(base, spec)
            start = time.monotonic()  # building the image is not part of spec.timeout
            tags = layers.labels(session.id, session.owner, session.reuse)
            if not spec.provision:
                return layers.commit(final, key, spec.name, None, base, "", tags)
            gid = f"t{uuid.uuid4().hex[:15]}"
            guest = Guest(
                gid, spec.name, session.id, state.guests_dir / gid, base, owner=session.owner
            )
            self.machines.boot(guest, spec)
            try:
                log = layers.provision(guest, spec, start)
                stop_guest(guest)
                upper = disk.upper_dir(guest.dir)
                return layers.commit(final, key, spec.name, upper, base, log, tags)
            finally:
                self.machines.destroy(guest.id)

    def remove(self, snapshot: Snapshot) -> None:
        """Remove a template or snapshot layer, unless a machine on disk still needs it.

        A guest (kept, running or dead) that stacks on the layer, directly or through a
        snapshot, or whose snapshot it is, keeps it: TemplateInUse names that machine (see
        :func:`.caches.held_by`, the rule ``vmenv images rm`` applies too). Its build lock
        file goes too, unless a build runs now (:func:`.caches.prune_build_locks`).
        """
        emu_dir = self.state.emu_dir
        layer = Path(snapshot.handle)
        holder = caches.held_by(emu_dir, layer)
        if holder:
            raise errors.TemplateInUse(
                f"{NAME}: template {snapshot.key or layer.name} left in place: {holder}", holder
            )
        layers.remove(layer, emu_dir)
        caches.prune_build_locks(emu_dir)
