"""``vm.expose_host_port`` on the real emulator: code in the guest reaches a server the test
runs on the host's loopback, and nothing else of the host.

The servers are ``http.server``s (and an echo server) in threads of this process, on the host's
127.0.0.1 and ephemeral ports; the clients are ``python3`` programs run in guests of the
``host`` image. Traffic goes only to those loopback servers and to the guests' own loopback.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_vmenv.backend import HostExposer, Network, Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.errors import MachineGone
from pytest_vmenv.machine import Machine
from pytest_vmenv.spec import MachineSpec

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's host image needs Linux and root",
)

_UNPRIVILEGED = importlib.util.spec_from_file_location(
    "_expose_userns", Path(__file__).with_name("test_unprivileged.py")
)
assert _UNPRIVILEGED is not None and _UNPRIVILEGED.loader is not None
unprivileged = sys.modules.setdefault(
    "_expose_userns", importlib.util.module_from_spec(_UNPRIVILEGED)
)
_UNPRIVILEGED.loader.exec_module(unprivileged)
area, nobody = unprivileged.area, unprivileged.nobody  # the fixtures, for the test as nobody
BIG = os.urandom(24 * 1024 * 1024)
FETCH = """
import hashlib, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, n = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def get(_):
    with opener.open(url, timeout=60) as response:
        return hashlib.sha256(response.read()).hexdigest()
with ThreadPoolExecutor(n) as pool:
    print(" ".join(pool.map(get, range(n))))
"""
CONNECT = """
import socket, sys, time
start = time.monotonic()
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__, round(time.monotonic() - start, 3))
"""
HALF_CLOSE = """
import socket, sys
payload = bytes(range(256)) * 8192
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as c:
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := c.recv(65536):
        reply += chunk
print(reply.decode())
"""


@dataclass
class Server:
    """An ``http.server`` on the host's 127.0.0.1: ``/`` is small, ``/big`` is :data:`BIG`;
    ``clients`` is every peer address it served."""

    port: int = 0
    clients: list[str] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve()


@pytest.fixture
def other() -> Iterator[Server]:
    """A second host server, never exposed."""
    yield from _serve()


def _serve() -> Iterator[Server]:
    record = Server()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record.clients.append(self.client_address[0])
            body = BIG if self.path == "/big" else b"hello from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def vm(backend: EmulatorBackend, session: Session, template: Snapshot) -> Iterator[Machine]:
    spec = MachineSpec(name="vm")
    ref = backend.clone(template, spec, session)
    yield Machine(backend, ref, spec)
    backend.destroy(ref)


def _in_guest(vm: Machine, script: str, *args: object) -> str:
    vm.write_text("/srv/client.py", script)
    return vm.succeed(" ".join(["python3 /srv/client.py", *map(str, args)]), timeout=120).strip()


def test_the_guest_reaches_a_host_server_on_its_own_loopback(
    vm: Machine, backend: EmulatorBackend, server: Server
) -> None:
    assert isinstance(backend, HostExposer)
    host, port = vm.expose_host_port(server.port)
    assert (host, port) == ("127.0.0.1", server.port)  # the same number: it is free in the guest
    assert vm.expose_host_port(server.port) == (host, port)
    assert backend.expose_host_port(vm.ref, server.port) == (host, port)
    got = _in_guest(vm, FETCH, f"http://{host}:{port}/", 1)
    assert got == hashlib.sha256(b"hello from the host\n").hexdigest()
    assert server.clients == ["127.0.0.1"]  # the relay, on the host's loopback


def test_a_large_body_to_several_concurrent_clients(vm: Machine, server: Server) -> None:
    host, port = vm.expose_host_port(server.port)
    got = _in_guest(vm, FETCH, f"http://{host}:{port}/big", 8)
    assert got.split() == [hashlib.sha256(BIG).hexdigest()] * 8
    assert len(server.clients) == 8


def test_another_host_port_is_not_reachable(vm: Machine, server: Server, other: Server) -> None:
    vm.expose_host_port(server.port)
    refused, took = _in_guest(vm, CONNECT, other.port).split()
    assert refused == "ConnectionRefusedError"
    assert float(took) < 2
    assert other.clients == []


def test_a_port_taken_in_the_guest_gives_another(vm: Machine, server: Server) -> None:
    vm.succeed(f"(setsid python3 -m http.server --bind 127.0.0.1 {server.port} >/dev/null 2>&1 &)")
    vm.wait_for_port(server.port)
    host, port = vm.expose_host_port(server.port)
    assert host == "127.0.0.1" and port != server.port
    got = _in_guest(vm, FETCH, f"http://{host}:{port}/", 1)
    assert got == hashlib.sha256(b"hello from the host\n").hexdigest()


@pytest.fixture
def echo() -> Iterator[int]:
    """A host server on 127.0.0.1 that replies once it has read to EOF."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                conn.sendall(b"got %d bytes" % total)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(10)


def test_half_close_passes_through(vm: Machine, echo: int) -> None:
    _, port = vm.expose_host_port(echo)
    assert _in_guest(vm, HALF_CLOSE, port) == f"got {256 * 8192} bytes"


def test_destroy_closes_the_listener_and_the_relays(
    backend: EmulatorBackend, session: Session, template: Snapshot, echo: int
) -> None:
    spec = MachineSpec(name="gone")
    ref = backend.clone(template, spec, session)
    vm = Machine(backend, ref, spec)
    _, port = vm.expose_host_port(echo)
    vm.succeed(
        "(setsid python3 -c 'import socket, time; "
        f's = socket.create_connection(("127.0.0.1", {port})); s.sendall(b"x"); '
        "time.sleep(600)' >/dev/null 2>&1 &)"
    )
    [relay] = backend._forwards.relays(ref.id)
    deadline = time.monotonic() + 10
    while not relay.live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(relay.live) == 1  # the guest's connection, relayed to the echo server
    [accepting] = [t for t in threading.enumerate() if t.name == f"vmenv-expose-{echo}"]
    backend.destroy(ref)
    accepting.join(5)
    assert not accepting.is_alive(), "the accepting thread outlived its machine"
    assert relay.closed and relay.listener.fileno() == -1 and not relay.live
    assert backend._forwards.relays(ref.id) == []
    with pytest.raises(MachineGone):
        vm.expose_host_port(echo + 1 if echo < 65535 else echo - 1)


def test_a_machine_on_a_network(
    backend: EmulatorBackend, session: Session, template: Snapshot, server: Server
) -> None:
    if not backend.capabilities().network:
        pytest.skip("the emulator's private network needs iproute2 here")
    spec = MachineSpec(name="web", network="lan")
    ref = backend.clone(template, spec, session, Network("lan", uuid.uuid4().hex[:8]))
    try:
        vm = Machine(backend, ref, spec)
        assert vm.ip
        host, port = vm.expose_host_port(server.port)
        got = _in_guest(vm, FETCH, f"http://{host}:{port}/", 1)
        assert got == hashlib.sha256(b"hello from the host\n").hexdigest()
    finally:
        backend.destroy(ref)


def test_an_exposed_port_outlives_a_revert(
    vm: Machine, backend: EmulatorBackend, template: Snapshot, server: Server
) -> None:
    """A revert starts a new PID 1 in a new network namespace: the listener is made again
    there, on the same guest port (free in the reverted guest), and the old one is closed."""
    address = vm.expose_host_port(server.port)
    [before] = backend._forwards.relays(vm.ref.id)
    vm.revert(template)
    assert vm.expose_host_port(server.port) == address
    _, port = address
    got = _in_guest(vm, FETCH, f"http://127.0.0.1:{port}/", 2)
    assert got.split() == [hashlib.sha256(b"hello from the host\n").hexdigest()] * 2
    [after] = backend._forwards.relays(vm.ref.id)
    assert before.closed and after is not before and not after.closed


def test_expose_host_port_through_the_plugin_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import http.server, threading
        import pytest

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "7")
                self.end_headers()
                self.wfile.write(b"called\\n")

            def log_message(self, *args):
                pass

        @pytest.mark.vm(image="host")
        def test_guest_calls_back(vm):
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            try:
                host, port = vm.expose_host_port(httpd.server_address[1])
                out = vm.succeed(
                    "python3 -c 'import sys, urllib.request; "
                    "o = urllib.request.build_opener(urllib.request.ProxyHandler({})); "
                    "print(o.open(sys.argv[1], timeout=30).read().decode(), end=str())' "
                    f"http://{host}:{port}/hook"
                )
                assert out == "called\\n"
            finally:
                httpd.shutdown()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


AS_NOBODY = """
import http.server, sys, threading
from pathlib import Path
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.machine import Machine
from pytest_vmenv.spec import MachineSpec
rootfs, state = sys.argv[1], Path(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "14")
        self.end_headers()
        self.wfile.write(b"rootless host\\n")
    def log_message(self, *args):
        pass
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
b = EmulatorBackend(state_dir=state)
s = Session(id="expose-userns", state_dir=state)
spec = MachineSpec(name="u", image=rootfs, image_config={"rootfs": rootfs})
template = b.build_template(spec, "expose-userns", s)
ref = b.clone(template, spec, s)
try:
    vm = Machine(b, ref, spec, state / "scratch")
    host, port = vm.expose_host_port(httpd.server_address[1])
    print("fetched:", vm.succeed(f"wget -q -O - http://{host}:{port}/").strip())
    b.destroy(ref)
    print("relays left:", len(b._forwards.relays(ref.id)))
finally:
    b.close()
    b.remove_template(template)
    httpd.shutdown()
"""


def test_expose_as_nobody(area: object, nobody: object) -> None:
    """Unprivileged, the guest-side listener is made by the namespace helper: busybox wget in
    the guest fetches from a server the unprivileged process runs on the host's loopback."""
    runner: Any = nobody
    unprivileged._need_userns(runner)
    where: Any = area  # its busybox rootfs has wget (test_unprivileged.APPLETS)
    res = runner.run(["python", "-c", AS_NOBODY, str(where.rootfs), str(where.state)])
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.stdout.splitlines() == ["fetched: rootless host", "relays left: 0"], res.stderr
