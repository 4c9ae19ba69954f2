"""``vm.forward`` on libvirt (QEMU user-mode ``hostfwd``, see :mod:`vmenv_libvirt.forwards`),
with a real busybox httpd in real tiny guests: a RAM-state clone and a cold-booted networked
clone, many concurrent requests, a large download checked by sha256, the port closed after
destroy, and ``restrict=on`` keeping the guest from the host's loopback.

The 50 requests go 4 at a time: libslirp listens with a backlog of 1, so a burst of 16 at once
had a connection wait out SYN retransmits past a 60 s timeout (see the libvirt README)."""

from __future__ import annotations

import hashlib
import secrets
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from vmenv_libvirt import LibvirtBackend

from pytest_vmenv.backend import MachineRef, Network, Session, Snapshot
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

SPEC = MachineSpec(image="tiny", backend="libvirt", memory=256 * 1024**2, timeout=120)
_BIG = 50 * 1024**2


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(id="lvf-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="lvf")


@pytest.fixture(scope="module")
def template(libvirt_backend: LibvirtBackend, session: Session) -> Iterator[Snapshot]:
    snap = libvirt_backend.build_template(SPEC, "lvf-" + session.id, session)
    yield snap
    libvirt_backend.remove_template(snap)


def _serve(backend: LibvirtBackend, ref: MachineRef) -> None:
    script = (
        "mkdir -p /tmp/www && echo hello >/tmp/www/index.html"
        f" && head -c {_BIG} /dev/urandom >/tmp/www/big"
        " && busybox httpd -p 0.0.0.0:8080 -h /tmp/www"
    )
    result = backend.execute(ref, ["/bin/sh", "-c", script], timeout=120)
    assert result.exit_code == 0, result.stderr


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


def _check_forward(backend: LibvirtBackend, ref: MachineRef) -> tuple[str, int]:
    _serve(backend, ref)
    host, port = backend.forward(ref, 8080)
    assert host == "127.0.0.1" and backend.forward(ref, 8080) == (host, port)
    base = f"http://{host}:{port}"
    start = time.monotonic()
    assert _get(base + "/index.html") == b"hello\n"
    print(f"first request: {time.monotonic() - start:.3f}s")
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(_get, [base + "/index.html"] * 50))
    assert bodies == [b"hello\n"] * 50
    digest = backend.execute(ref, ["/bin/sh", "-c", "sha256sum /tmp/www/big"]).stdout.split()[0]
    start = time.monotonic()
    big = _get(base + "/big")
    seconds = time.monotonic() - start
    print(f"50 MiB in {seconds:.2f}s ({_BIG / seconds / 1024**2:.1f} MiB/s)")
    assert len(big) == _BIG and hashlib.sha256(big).hexdigest() == digest
    return host, port


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return True
    return False


def test_forward_on_a_ram_state_clone(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session
) -> None:
    ref = libvirt_backend.clone(template, replace(SPEC, name="fwd-ram"), session)
    try:
        host, port = _check_forward(libvirt_backend, ref)
    finally:
        libvirt_backend.destroy(ref)
    assert _refused(host, port)


def test_forward_on_a_cold_booted_networked_clone(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session
) -> None:
    lan = Network("fwd", secrets.token_hex(3))
    ref = libvirt_backend.clone(template, replace(SPEC, name="fwd-cold"), session, lan)
    try:
        host, port = _check_forward(libvirt_backend, ref)
        routes = libvirt_backend.execute(ref, ["ip", "route"]).stdout
        assert "10.0.2.2" not in routes, routes
    finally:
        libvirt_backend.destroy(ref)
    assert _refused(host, port)


def test_restrict_keeps_the_guest_from_the_host(
    libvirt_backend: LibvirtBackend, template: Snapshot, session: Session
) -> None:
    canary = socket.create_server(("127.0.0.1", 0))
    canary.settimeout(0.5)
    port = canary.getsockname()[1]
    ref = libvirt_backend.clone(template, replace(SPEC, name="fwd-restrict"), session)
    try:
        served = "busybox httpd -p 0.0.0.0:8080 -h /tmp && printf 'GET / HTTP/1.0\\r\\n\\r\\n'"
        control = libvirt_backend.execute(
            ref, ["/bin/sh", "-c", f"{served} | nc -w 3 10.0.2.15 8080"], timeout=60
        )
        assert control.exit_code == 0 and "HTTP/1." in control.stdout, control
        for target in ("10.0.2.2", "10.0.2.3"):
            tried = libvirt_backend.execute(
                ref, ["/bin/sh", "-c", f"echo x | nc -w 3 {target} {port}"], timeout=60
            )
            assert tried.exit_code != 0, (target, tried)
        with pytest.raises(TimeoutError):
            canary.accept()
    finally:
        libvirt_backend.destroy(ref)
        canary.close()
