"""OwnershipTests: whose machines are whose, across sessions, instances and processes.

``owned(session_id)`` finds exactly a session's machines; a kept machine outlives the instance
that made it; another process, knowing only the backend's options, finds a machine through
``owned()`` and destroys it (what ``vmenv gc`` and the crash sweep do).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import pytest

from ..backend import Backend, Closer, Session, Snapshot
from ..errors import MachineGone
from ..machine import Machine
from ..spec import MachineSpec
from .fixtures import ids, new_session

__all__ = ["OwnershipTests", "destroy_elsewhere"]

SPAWN_TIMEOUT = 300.0


def destroy_elsewhere(factory: Callable[[], Backend], session_id: str, ref_id: str) -> list[str]:
    """In a fresh process: destroy the machine ``ref_id`` found in ``owned(session_id)``.

    Returns the ids it found (and destroyed), so the caller sees ``owned()`` worked here.
    """
    backend = factory()
    try:
        found = [ref for ref in backend.owned(session_id) if ref.id == ref_id]
        for ref in found:
            backend.destroy(ref)
        return [ref.id for ref in found]
    finally:
        if isinstance(backend, Closer):
            backend.close()


def _close(backend: Backend) -> None:
    if isinstance(backend, Closer):
        backend.close()


class OwnershipTests:
    """``owned``, ``keep`` and ``destroy`` seen from other sessions, instances, processes."""

    def test_owned_finds_exactly_our_machines(
        self, backend: Backend, template: Snapshot, base_spec: MachineSpec, session: Session
    ) -> None:
        other = new_session()
        mine = [
            backend.clone(template, replace(base_spec, name=f"m{i}"), session) for i in range(2)
        ]
        theirs = backend.clone(template, base_spec, other)
        try:
            assert ids(backend.owned(session.id)) >= ids(mine)
            assert theirs.id not in ids(backend.owned(session.id))
            assert ids(backend.owned(other.id)) == {theirs.id}
            assert all(r.session == other.id for r in backend.owned(other.id))
            assert ids(backend.owned()) >= ids([*mine, theirs])
        finally:
            for ref in [*mine, theirs]:
                backend.destroy(ref)
        assert not list(backend.owned(other.id))

    def test_keep_outlives_the_instance_that_made_it(
        self,
        backend: Backend,
        second_backend: Callable[[], Backend],
        template: Snapshot,
        base_spec: MachineSpec,
        session: Session,
    ) -> None:
        """A machine kept by one instance, once that instance is closed, is still listed as
        kept, still runs commands from another instance, and goes with ``destroy``."""
        spec = replace(base_spec, name="kept")
        keeper = second_backend()
        try:
            made = keeper.clone(template, spec, session)
            try:
                keeper.keep(made)
            except BaseException:
                keeper.destroy(made)
                raise
        finally:
            _close(keeper)
        try:
            ref = {r.id: r for r in backend.owned(session.id)}[made.id]
            assert ref.kept
            assert Machine(backend, ref, spec).succeed("echo still here") == "still here\n"
        finally:
            backend.destroy(made)
        assert made.id not in ids(backend.owned(session.id))
        with pytest.raises(MachineGone):
            backend.execute(made, ["true"])

    def test_destroy_from_another_process(
        self,
        backend: Backend,
        backend_factory: Callable[[], Backend],
        template: Snapshot,
        base_spec: MachineSpec,
        session: Session,
    ) -> None:
        """A process of its own (``spawn``: nothing inherited but the factory) finds the
        machine in ``owned()`` and destroys it; here it is gone, and destroying it is success."""
        ref = backend.clone(template, replace(base_spec, name="elsewhere"), session)
        try:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                found = pool.submit(destroy_elsewhere, backend_factory, session.id, ref.id)
                assert found.result(timeout=SPAWN_TIMEOUT) == [ref.id]
            assert ref.id not in ids(backend.owned(session.id))
            with pytest.raises(MachineGone):
                backend.execute(ref, ["true"])
        finally:
            backend.destroy(ref)
