"""BackendConformance: the one test suite every backend must pass.

Use it from a backend's tests by providing two fixtures::

    from pytest_vmenv.testing import BackendConformance

    class TestEmulator(BackendConformance):
        @pytest.fixture(scope="class")
        def backend(self):
            backend = EmulatorBackend()
            backend.check()
            yield backend
            backend.close()

        @pytest.fixture(scope="class")
        def base_spec(self):
            return MachineSpec(image="host")

The image of ``base_spec`` needs a POSIX ``/bin/sh`` with ``cat``, ``printf``, ``sleep``,
``head`` and ``echo`` (busybox is enough). Everything runs against the real backend.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from .backend import Backend, MachineRef, Session, Snapshot
from .errors import (
    CommandFailed,
    CommandTimeout,
    FileTooLarge,
    MachineGone,
    ProvisionError,
    VmenvError,
)
from .machine import Machine
from .orchestrator import template_key
from .paths import state_dir
from .spec import MachineSpec

__all__ = ["BackendConformance"]

MiB = 1 << 20


def _session() -> Session:
    return Session(id="conf-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="conf")


class BackendConformance:
    """Lifecycle, commands, files, snapshots and ownership, proven on a real backend."""

    @pytest.fixture(scope="class")
    def session(self) -> Session:
        return _session()

    @pytest.fixture(scope="class")
    def template(
        self, backend: Backend, base_spec: MachineSpec, session: Session
    ) -> Iterator[Snapshot]:
        snap = backend.build_template(
            base_spec, template_key(base_spec) + "-" + session.id, session
        )
        yield snap
        backend.remove_template(snap)

    @pytest.fixture
    def clone(
        self, backend: Backend, template: Snapshot, base_spec: MachineSpec, session: Session
    ) -> Iterator[Machine]:
        made: list[MachineRef] = []

        def make(name: str = "conf") -> Machine:
            spec = replace(base_spec, name=name)
            ref = backend.clone(template, spec, session)
            made.append(ref)
            return Machine(backend, ref, spec)

        self._make = make
        yield make("conf")
        for ref in made:
            backend.destroy(ref)

    # -- lifecycle ---------------------------------------------------------------------------

    def test_clone_runs_and_is_owned(
        self, backend: Backend, clone: Machine, session: Session
    ) -> None:
        assert clone.succeed("echo hello") == "hello\n"
        ids = {ref.id for ref in backend.owned(session.id)}
        assert clone.ref.id in ids

    def test_hostname_is_machine_name(self, clone: Machine) -> None:
        assert clone.succeed("cat /proc/sys/kernel/hostname").strip() == clone.name

    def test_destroy_is_idempotent_and_final(
        self, backend: Backend, template: Snapshot, base_spec: MachineSpec, session: Session
    ) -> None:
        ref = backend.clone(template, base_spec, session)
        backend.destroy(ref)
        backend.destroy(ref)
        assert ref.id not in {r.id for r in backend.owned(session.id)}
        with pytest.raises(MachineGone):
            backend.execute(ref, ["true"])

    def test_owned_finds_exactly_our_machines(
        self, backend: Backend, template: Snapshot, base_spec: MachineSpec, session: Session
    ) -> None:
        other = _session()
        mine = [
            backend.clone(template, replace(base_spec, name=f"m{i}"), session) for i in range(2)
        ]
        theirs = backend.clone(template, base_spec, other)
        try:
            assert {r.id for r in backend.owned(session.id)} >= {r.id for r in mine}
            assert theirs.id not in {r.id for r in backend.owned(session.id)}
            assert {r.id for r in backend.owned(other.id)} == {theirs.id}
            assert all(r.session == other.id for r in backend.owned(other.id))
        finally:
            for ref in [*mine, theirs]:
                backend.destroy(ref)
        assert not list(backend.owned(other.id))

    # -- commands ----------------------------------------------------------------------------

    def test_exit_codes(self, clone: Machine) -> None:
        assert clone.run("exit 3").exit_code == 3
        assert clone.run(["/bin/sh", "-c", "exit 7"]).exit_code == 7
        assert clone.run("true").exit_code == 0
        assert clone.run("kill -9 $$").exit_code == 128 + 9
        assert clone.run(["/no/such/program"]).exit_code == 127

    def test_succeed_and_fail(self, clone: Machine) -> None:
        with pytest.raises(CommandFailed) as info:
            clone.succeed("echo out; echo err >&2; exit 4")
        message = str(info.value)
        assert "exit 4" in message and "exited with 4" in message
        assert "out" in message and "err" in message
        assert isinstance(info.value, AssertionError)
        assert clone.fail("exit 1") == ""
        with pytest.raises(CommandFailed):
            clone.fail("true")

    def test_binary_safe_output(self, clone: Machine) -> None:
        result = clone.run(r"printf '\000\377\200ok'; printf '\001\376' >&2")
        assert result.stdout_bytes == b"\x00\xff\x80ok"
        assert result.stderr_bytes == b"\x01\xfe"

    def test_large_output_and_input(self, clone: Machine) -> None:
        data = bytes(range(256)) * 4096  # 1 MiB
        result = clone.run("cat", input=data)
        assert result.stdout_bytes == data
        big = clone.run("head -c 3000000 /dev/zero")
        assert len(big.stdout_bytes) == 3_000_000

    def test_output_is_capped_per_stream(self, clone: Machine) -> None:
        result = clone.run("head -c 3000000 /dev/zero; echo err >&2", max_output=MiB)
        assert (len(result.stdout_bytes), result.stdout_dropped) == (MiB, 3_000_000 - MiB)
        assert (result.stderr, result.stderr_dropped, result.truncated) == ("err\n", 0, True)

    def test_stdin_and_env(self, clone: Machine) -> None:
        assert clone.succeed("cat", input="line\n") == "line\n"
        assert clone.succeed("echo $GREETING", env={"GREETING": "hi there"}) == "hi there\n"
        assert clone.succeed(["printf", "%s|", "a b", "c"]) == "a b|c|"

    def test_timeout_kills_the_process_group(self, clone: Machine) -> None:
        start = time.monotonic()
        with pytest.raises(CommandTimeout):
            clone.run("sleep 300 & echo $! > /var/tmp/bg.pid; sleep 300", timeout=1)
        assert time.monotonic() - start < 10
        pid = clone.succeed("cat /var/tmp/bg.pid").strip()
        clone.wait_until_fails(f"kill -0 {pid}", timeout=5)
        assert clone.run("true").exit_code == 0

    def test_background_process_does_not_hang_run(self, clone: Machine) -> None:
        start = time.monotonic()
        assert clone.run("sleep 60 &").exit_code == 0
        assert time.monotonic() - start < 5

    # -- files ---------------------------------------------------------------------------------

    def test_files_in_and_out(self, clone: Machine, tmp_path: Path) -> None:
        src = tmp_path / "in.bin"
        src.write_bytes(bytes(range(256)) * 100)
        clone.put(src, "/var/tmp/in.bin")
        assert clone.succeed("wc -c < /var/tmp/in.bin").strip() == "25600"
        clone.get("/var/tmp/in.bin", tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        clone.write_text("/var/tmp/t.txt", "text ✓\n")
        assert clone.read_text("/var/tmp/t.txt") == "text ✓\n"
        with pytest.raises(VmenvError):
            clone.get("/no/such/file", tmp_path / "missing")

    def test_get_refuses_a_file_over_max_size(self, clone: Machine, tmp_path: Path) -> None:
        clone.succeed("head -c 100000 /dev/zero > /var/tmp/big")
        with pytest.raises(FileTooLarge):
            clone.get("/var/tmp/big", tmp_path / "big", max_size=50000)
        assert not (tmp_path / "big").exists()
        clone.get("/var/tmp/big", tmp_path / "big", max_size=100000)
        assert (tmp_path / "big").read_bytes() == bytes(100000)

    # -- snapshots and clones --------------------------------------------------------------------

    def test_snapshot_and_revert(self, clone: Machine) -> None:
        clone.write_text("/var/tmp/state", "before")
        snap = clone.snapshot("before")
        clone.write_text("/var/tmp/state", "after")
        clone.write_text("/var/tmp/new", "new")
        clone.revert(snap)
        assert clone.read_text("/var/tmp/state") == "before"
        assert clone.run("test -e /var/tmp/new").exit_code != 0
        assert clone.succeed("echo alive") == "alive\n"

    def test_revert_to_template(self, clone: Machine, template: Snapshot) -> None:
        clone.write_text("/var/tmp/dirty", "x")
        clone.revert(template)
        assert clone.run("test -e /var/tmp/dirty").exit_code != 0

    def test_clones_are_independent(self, clone: Machine) -> None:
        other = self._make("other")
        clone.write_text("/var/tmp/mine", "a")
        assert other.run("test -e /var/tmp/mine").exit_code != 0
        third = self._make("third")
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
