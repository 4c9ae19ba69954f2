"""SnapshotTests: templates built, shared by key and removed; snapshots taken and reverted.

Where the backend's ``reverts_files`` fixture is False, a revert is still called and the
machine must still answer after it; only the check of its files is left out.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from ..backend import Backend, Session, Snapshot, TemplateLister
from ..errors import ProvisionError
from ..machine import Machine
from ..orchestrator import template_key
from ..spec import MachineSpec
from .fixtures import MachineMaker

__all__ = ["SnapshotTests"]


class SnapshotTests:
    """``snapshot``/``revert``, ``build_template``/``remove_template``, clone isolation."""

    def test_snapshot_and_revert(self, clone: Machine, reverts_files: bool) -> None:
        clone.write_text("/var/tmp/state", "before")
        snap = clone.snapshot("before")
        clone.write_text("/var/tmp/state", "after")
        clone.write_text("/var/tmp/new", "new")
        clone.revert(snap)
        assert clone.succeed("echo alive") == "alive\n"
        if reverts_files:
            assert clone.read_text("/var/tmp/state") == "before"
            assert clone.run("test -e /var/tmp/new").exit_code != 0

    def test_revert_to_template(
        self, machines: MachineMaker, template: Snapshot, reverts_files: bool
    ) -> None:
        """A machine made with ``isolation="revert"`` (as the orchestrator pools them) goes
        back to the template it was cloned from."""
        machine = machines("pooled", isolation="revert")
        machine.write_text("/var/tmp/dirty", "x")
        machine.revert(template)
        assert machine.succeed("echo alive") == "alive\n"
        if reverts_files:
            assert machine.run("test -e /var/tmp/dirty").exit_code != 0

    def test_clones_are_independent(self, clone: Machine, machines: MachineMaker) -> None:
        other = machines("other")
        clone.write_text("/var/tmp/mine", "a")
        assert other.run("test -e /var/tmp/mine").exit_code != 0
        third = machines("third")
        assert third.run("test -e /var/tmp/mine").exit_code != 0

    def test_template_provision(
        self, backend: Backend, base_spec: MachineSpec, session: Session
    ) -> None:
        spec = replace(base_spec, provision=("echo provisioned > /var/tmp/p", ("true",)))
        snap = backend.build_template(spec, template_key(spec) + "-" + session.id, session)
        try:
            ref = backend.clone(snap, spec, session)
            try:
                machine = Machine(backend, ref, spec)
                assert machine.read_text("/var/tmp/p") == "provisioned\n"
            finally:
                backend.destroy(ref)
        finally:
            backend.remove_template(snap)
        bad = replace(base_spec, provision=("echo broken >&2; exit 9",))
        with pytest.raises(ProvisionError, match="broken"):
            backend.build_template(bad, template_key(bad) + "-" + session.id, session)

    def test_template_reuse_by_key(
        self, backend: Backend, base_spec: MachineSpec, session: Session
    ) -> None:
        """The same key gives the template already built, not built again (how workers and
        ``--vm-reuse`` share one); another key gives another template."""
        spec = replace(base_spec, provision=("echo built >> /var/tmp/builds",))
        key = template_key(spec) + "-" + session.id
        first = backend.build_template(spec, key, session)
        try:
            again = backend.build_template(spec, key, session)
            assert (again.handle, again.key) == (first.handle, key)
            other = backend.build_template(spec, key + "-other", session)
            try:
                assert (other.key, other.handle != first.handle) == (key + "-other", True)
            finally:
                backend.remove_template(other)
            ref = backend.clone(again, spec, session)
            try:
                assert Machine(backend, ref, spec).read_text("/var/tmp/builds") == "built\n"
            finally:
                backend.destroy(ref)
        finally:
            backend.remove_template(first)

    def test_remove_template_of_a_gone_template(
        self, backend: Backend, base_spec: MachineSpec, session: Session, template: Snapshot
    ) -> None:
        """Removing a template that is gone already is success, and leaves others alone."""
        spec = replace(base_spec, provision=("true",))
        snap = backend.build_template(spec, template_key(spec) + "-gone-" + session.id, session)
        backend.remove_template(snap)
        backend.remove_template(snap)
        if isinstance(backend, TemplateLister):
            assert snap.handle not in {t.handle for t in backend.templates()}
        ref = backend.clone(template, base_spec, session)
        try:
            assert Machine(backend, ref, base_spec).succeed("echo ok") == "ok\n"
        finally:
            backend.destroy(ref)
