"""LifecycleTests: a clone runs, is named, says what its console printed, and goes for good."""

from __future__ import annotations

import secrets

import pytest

from ..backend import Backend, Capabilities, Session, Snapshot
from ..errors import MachineGone
from ..machine import Machine
from ..poll import poll_until
from ..spec import MachineSpec
from .fixtures import ids, require

__all__ = ["LifecycleTests"]

CONSOLE_TIMEOUT = 15.0


class LifecycleTests:
    """Clone, name, console log, destroy."""

    def test_clone_runs_and_is_owned(
        self, backend: Backend, clone: Machine, session: Session
    ) -> None:
        assert clone.succeed("echo hello") == "hello\n"
        assert clone.ref.id in ids(backend.owned(session.id))

    def test_hostname_is_machine_name(self, clone: Machine) -> None:
        assert clone.succeed("cat /proc/sys/kernel/hostname").strip() == clone.name

    def test_destroy_is_idempotent_and_final(
        self, backend: Backend, template: Snapshot, base_spec: MachineSpec, session: Session
    ) -> None:
        ref = backend.clone(template, base_spec, session)
        backend.destroy(ref)
        backend.destroy(ref)
        assert ref.id not in ids(backend.owned(session.id))
        with pytest.raises(MachineGone):
            backend.execute(ref, ["true"])

    def test_console_log(self, clone: Machine, capabilities: Capabilities) -> None:
        """A backend with ``console_log`` shows what the guest writes on ``/dev/console``."""
        assert isinstance(clone.console_log(), str)
        require(capabilities.console_log, "capabilities().console_log is False: no console")
        mark = "conformance-console-" + secrets.token_hex(4)
        clone.succeed(f"echo {mark} > /dev/console")
        poll_until(
            lambda last_try: True if mark in clone.console_log() else None,
            timeout=CONSOLE_TIMEOUT,
            what=f"{mark!r}, written on /dev/console, in console_log()",
            error=AssertionError,
        )
