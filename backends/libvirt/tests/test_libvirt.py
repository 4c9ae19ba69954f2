"""libvirt-specific behaviour, against the real libvirtd: what a user of this backend relies on.

Accelerator verdict cached per boot, labels in ``<metadata>`` found by ``owned()``, a private
network on which clones reach each other by name, ``destroy`` from another process, and a
libvirtd connection that drops mid-session (re-connect, nothing leaks).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest
import vmenv_libvirt
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.connection import is_transient
from vmenv_libvirt.domains import NS, read_labels, set_labels

from pytest_vmenv.backend import Network, Session, Snapshot, boot_id
from pytest_vmenv.errors import BackendError, BackendUnavailable, MachineGone
from pytest_vmenv.machine import Machine
from pytest_vmenv.paths import state_dir
from pytest_vmenv.reaper import sweep
from pytest_vmenv.spec import MachineSpec

SPEC = MachineSpec(image="tiny", backend="libvirt", memory=256 * 1024**2, timeout=120)


def _session() -> Session:
    return Session(id="lvt-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="lvt")


@pytest.fixture(scope="module")
def session() -> Session:
    return _session()


@pytest.fixture(scope="module")
def template(libvirt_backend: LibvirtBackend, session: Session) -> Iterator[Snapshot]:
    snap = libvirt_backend.build_template(SPEC, "lvt-" + session.id, session)
    yield snap
    libvirt_backend.remove_template(snap)


def test_template_is_reused_for_its_key(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session
) -> None:
    again = libvirt_backend.build_template(SPEC, template.key, session)
    assert again.handle == template.handle
    assert again.created == template.created  # not rebuilt
    assert template.key in {t.key for t in libvirt_backend.templates()}


def test_accel_verdict_is_cached_per_boot(
    libvirt_backend: LibvirtBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    verdict = libvirt_backend.parts.accel.verdict()
    cache = json.loads((libvirt_backend.parts.paths.root / "accel.json").read_text())
    assert cache["boot_id"] == boot_id() and cache["accel"] == verdict.accel
    assert verdict.reason
    assert LibvirtBackend({}).parts.accel.verdict().cached
    assert LibvirtBackend({"accel": "tcg"}).parts.accel.verdict().accel == "tcg"
    # A verdict of another boot is not trusted: the probe runs again (on a copy of the image).
    other = state_dir() / "libvirt-test" / secrets.token_hex(4)
    try:
        shutil.copytree(
            libvirt_backend.parts.paths.root / "images",
            other / "libvirt" / "images",
            ignore=shutil.ignore_patterns("*.lock", "*.build"),
        )
        (other / "libvirt" / "accel.json").write_text(
            json.dumps({"boot_id": "another-boot", "accel": "kvm", "reason": "stale"})
        )
        fresh = LibvirtBackend({}, state_dir=other)
        probed = fresh.parts.accel.verdict()
        assert not probed.cached and probed.reason != "stale"
        assert json.loads((other / "libvirt" / "accel.json").read_text())["boot_id"] == boot_id()
        assert not [d for d in fresh.owned() if "probe" in d.id]
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_labels_in_metadata_and_owned(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session
) -> None:
    ref = libvirt_backend.clone(template, replace(SPEC, name="labelled"), session)
    try:
        mine = {r.id: r for r in libvirt_backend.owned(session.id)}
        assert ref.id in mine
        found = mine[ref.id]
        assert found.owner == session.owner and found.session == session.id
        assert abs(found.created - ref.created) < 1 and not found.kept
        conn = libvirt.open(libvirt_backend.uris[0])
        try:
            xml = conn.lookupByName(ref.id).XMLDesc(0)
        finally:
            conn.close()
        assert NS in xml and session.id in xml
        libvirt_backend.keep(ref)
        assert {r.id: r for r in libvirt_backend.owned(session.id)}[ref.id].kept
    finally:
        libvirt_backend.destroy(ref)
    assert ref.id not in {r.id for r in libvirt_backend.owned(session.id)}
    assert not (libvirt_backend.parts.pool.path / f"{ref.id}.qcow2").exists()
    assert not libvirt_backend.parts.paths.console(ref.id).exists()


def test_a_sweep_of_another_state_dir_leaves_our_kept_machine(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session
) -> None:
    """libvirtd is shared by every checkout and user of a host: ``vmenv gc --all`` (a sweep
    that includes kept machines of dead owners) of one state dir must not touch another's."""
    ref = libvirt_backend.clone(template, replace(SPEC, name="kept-elsewhere"), session)
    other = state_dir() / "libvirt-test" / secrets.token_hex(4)
    try:
        libvirt_backend.keep(ref)
        conn = libvirt.open(libvirt_backend.uris[0])
        try:  # as a session that ended with --vm-keep leaves it: its owner is gone
            domain = conn.lookupByName(ref.id)
            labels = read_labels(domain) or {}
            set_labels(domain, {**labels, "owner": f"{boot_id()}:1:gone"})
        finally:
            conn.close()
        elsewhere = LibvirtBackend({}, state_dir=other)
        assert ref.id not in {r.id for r in elsewhere.owned(None)}
        report = sweep([elsewhere], other, include_kept=True)
        assert not any(ref.id in line for line in report.removed), report
        assert ref.id in {r.id for r in libvirt_backend.owned(None)}
    finally:
        libvirt_backend.destroy(ref)
        shutil.rmtree(other, ignore_errors=True)


def test_lan_reaches_the_other_clone_by_name(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session
) -> None:
    spec = replace(SPEC, network="lan")
    lan = Network("lan", secrets.token_hex(3))
    refs = []
    try:
        for name in ("server", "client"):
            refs.append(libvirt_backend.clone(template, replace(spec, name=name), session, lan))
        server, client = (Machine(libvirt_backend, r, replace(spec, name=r.name)) for r in refs)
        assert server.ref.ip and client.ref.ip and server.ref.ip != client.ref.ip
        server.succeed("(echo hello-from-server | nc -l -p 7777 >/dev/null 2>&1) &")
        out = client.wait_until_succeeds("nc -w 2 server 7777 </dev/null", timeout=20)
        assert "hello-from-server" in out
        net = libvirt_backend.parts.networks.name_of(lan, session.id)
        assert "<forward" not in _net_xml(libvirt_backend, net)
    finally:
        for ref in refs:
            libvirt_backend.destroy(ref)
    with pytest.raises(libvirt.libvirtError):
        _net_xml(libvirt_backend, net)  # removed with its last machine


def _net_xml(backend: LibvirtBackend, name: str) -> str:
    conn = libvirt.open(backend.uris[0])
    try:
        return str(conn.networkLookupByName(name).XMLDesc(0))
    finally:
        conn.close()


def test_destroy_from_another_process(libvirt_backend: LibvirtBackend, template: Snapshot) -> None:
    other = _session()
    ref = libvirt_backend.clone(template, replace(SPEC, name="orphan"), other)
    script = textwrap.dedent(f"""
        from vmenv_libvirt import LibvirtBackend
        b = LibvirtBackend({{}})
        refs = list(b.owned({other.id!r}))
        assert [r.id for r in refs] == [{ref.id!r}], refs
        for r in refs:
            b.destroy(r)
            b.destroy(r)
        print("destroyed", len(refs))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "destroyed 1" in done.stdout
    assert not list(libvirt_backend.owned(other.id))
    with pytest.raises(MachineGone):
        libvirt_backend.execute(ref, ["true"])
    assert not (libvirt_backend.parts.pool.path / f"{ref.id}.qcow2").exists()


def test_connection_dropped_mid_session_reconnects(template: Snapshot) -> None:
    session = _session()
    backend = LibvirtBackend({})
    backend.check()
    ref = backend.clone(template, replace(SPEC, name="dropped"), session)
    try:
        # the connection dies under the backend (a keepalive timeout or a daemon restart
        # closes it the same way); a socket-level cut cannot be aimed reliably from here
        dropped = backend.hv.conn()
        dropped.close()
        assert backend.execute(ref, ["echo", "still here"]).stdout == "still here\n"
        assert backend.hv.conn() is not dropped  # re-connected
    finally:
        backend.destroy(ref)
        backend.close()
    assert not list(LibvirtBackend({}).owned(session.id))


def test_unreachable_libvirtd_is_a_clear_error(tmp_path: Path) -> None:
    backend = LibvirtBackend({"uri": f"qemu:///system?socket={tmp_path}/no-such.sock"})
    backend.hv.attempts = 2
    with pytest.raises(BackendUnavailable, match="cannot connect to qemu:///system"):
        backend.check()


def _libvirt_error(fn: Callable[[], object]) -> libvirt.libvirtError:
    try:
        fn()
    except libvirt.libvirtError as exc:
        return exc
    raise AssertionError("no libvirt error")


def test_only_a_dropped_connection_is_transient(
    libvirt_backend: LibvirtBackend, tmp_path: Path
) -> None:
    """Real errors of the real daemon: the transport's are transient, the drivers' are not."""
    conn = libvirt_backend.hv.conn()
    closed = libvirt.open(libvirt_backend.uris[0])
    closed.close()
    transient = {
        "closed connection": _libvirt_error(closed.getLibVersion),
        "daemon not there": _libvirt_error(
            lambda: libvirt.open(f"qemu:///system?socket={tmp_path}/no-such.sock")
        ),
    }
    missing = f"{tmp_path}/no-such-dir"
    failures = {  # VIR_ERR_SYSTEM_ERROR from a driver, as "Unable to find 'dnsmasq' binary"
        "missing directory": _libvirt_error(lambda: conn.storagePoolCreateXML(
            f"<pool type='dir'><name>vmenv-t-{secrets.token_hex(4)}</name>"
            f"<target><path>{missing}</path></target></pool>", 0)),
        "invalid XML": _libvirt_error(lambda: conn.networkCreateXML("<network><name>x</name")),
        "no such network": _libvirt_error(lambda: conn.networkLookupByName("vmenv-no-such")),
    }  # fmt: skip
    assert failures["missing directory"].get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
    assert {k: is_transient(e) for k, e in transient.items()} == dict.fromkeys(transient, True)
    assert {k: is_transient(e) for k, e in failures.items()} == dict.fromkeys(failures, False)


def test_a_failure_that_is_no_dropped_connection_says_libvirts_message_at_once(
    tmp_path: Path, session: Session
) -> None:
    """A domain template with a data disk that does not exist: the storage driver's
    VIR_ERR_SYSTEM_ERROR (the code of "Unable to find 'dnsmasq' binary") is the operation's
    failure, reported with libvirt's message, not as a connection that did not come back."""
    stock = Path(vmenv_libvirt.__file__).parent / "templates" / "domain.xml.j2"
    missing = tmp_path / "no-such-data-disk.qcow2"
    extra = (
        f'<disk type="file" device="disk"><driver name="qemu" type="qcow2"/>'
        f'<source file="{missing}"/><target dev="vdb" bus="virtio"/></disk>'
    )
    custom = tmp_path / "domain.xml.j2"
    custom.write_text(stock.read_text().replace("  <devices>", "  <devices>\n    " + extra, 1))
    backend = LibvirtBackend({"domain_xml": str(custom)})
    backend.check()
    first = backend.hv.conn()
    started = time.monotonic()
    try:
        with pytest.raises(BackendError) as info:
            backend.build_template(replace(SPEC, name="nodisk"), f"lvt-nd-{session.id}", session)
        took = time.monotonic() - started
        assert backend.hv.conn() is first  # never re-connected
    finally:
        backend.close()
    message = str(info.value)
    assert f"Cannot access storage file '{missing}'" in message, message
    assert "connection" not in message and "libvirtd running" not in message, message
    assert took < backend.hv.window / 2, f"{took:.1f}s"
    assert not list(LibvirtBackend({}).owned(session.id))
