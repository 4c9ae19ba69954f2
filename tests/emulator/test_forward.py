"""``vm.forward``/``vm.url`` on the real emulator: the test's own code talks to guest services.

Every server runs inside a guest of the ``host`` image (it has python3), mostly bound to the
guest's own 127.0.0.1, which only a relay that connects from inside the guest's network
namespace reaches. Traffic goes only to the host's loopback and into the guests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pytest_vmenv.backend import Network, Session, Snapshot
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.emulator.host import relay
from pytest_vmenv.errors import MachineGone
from pytest_vmenv.machine import Machine
from pytest_vmenv.poll import poll_until
from pytest_vmenv.spec import MachineSpec

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the emulator's host image and vm.forward need Linux and root",
)

PORT = 8000
_UNPRIVILEGED = importlib.util.spec_from_file_location(
    "_forward_userns", Path(__file__).with_name("test_unprivileged.py")
)
assert _UNPRIVILEGED is not None and _UNPRIVILEGED.loader is not None
unprivileged = sys.modules.setdefault(
    "_forward_userns", importlib.util.module_from_spec(_UNPRIVILEGED)
)
_UNPRIVILEGED.loader.exec_module(unprivileged)
area, nobody = unprivileged.area, unprivileged.nobody  # the fixtures, for the test as nobody
ECHO = (
    "import socket\n"
    "s = socket.create_server(('127.0.0.1', 7000))\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    data = b''\n"
    "    while chunk := c.recv(65536):\n"
    "        data += chunk\n"
    "    c.sendall(b'got %d bytes' % len(data))\n"
    "    c.close()\n"
)


def serve_http(vm: Machine, bind: str = "127.0.0.1", port: int = PORT) -> None:
    """A ``python3 -m http.server`` on ``bind:port`` in the guest, serving ``/srv/www``."""
    vm.succeed(
        "mkdir -p /srv/www && echo hello from the guest > /srv/www/index.html && cd /srv/www && "
        f"(setsid python3 -m http.server --bind {bind} {port} >/dev/null 2>&1 &)"
    )
    vm.wait_for_port(port)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: bytes = response.read()
        return body


@pytest.fixture
def vm(backend: EmulatorBackend, session: Session, template: Snapshot) -> Iterator[Machine]:
    spec = MachineSpec(name="vm")
    ref = backend.clone(template, spec, session)
    yield Machine(backend, ref, spec)
    backend.destroy(ref)


def test_url_reaches_a_server_on_the_guests_loopback(vm: Machine) -> None:
    serve_http(vm)
    url = vm.url(PORT, "index.html")
    host, port = vm.forward(PORT)
    assert url == f"http://127.0.0.1:{port}/index.html"
    assert host == "127.0.0.1"
    assert vm.forward(PORT) == (host, port)  # the same port twice: the same address
    assert fetch(url) == b"hello from the guest\n"
    # The guest's server is not on the host's loopback: only the forward reaches it.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()


def test_fifty_concurrent_requests(vm: Machine) -> None:
    serve_http(vm)
    url = vm.url(PORT, "/index.html")
    with ThreadPoolExecutor(max_workers=50) as pool:
        bodies = list(pool.map(lambda _: fetch(url), range(50)))
    assert bodies == [b"hello from the guest\n"] * 50


def test_a_50_mib_download_arrives_whole(vm: Machine) -> None:
    serve_http(vm)
    vm.succeed("head -c 52428800 /dev/urandom > /srv/www/big")
    expected = vm.succeed("sha256sum /srv/www/big").split()[0]
    body = fetch(vm.url(PORT, "/big"))
    assert len(body) == 50 * 1024 * 1024
    assert hashlib.sha256(body).hexdigest() == expected


def _start_echo(vm: Machine) -> tuple[str, int]:
    vm.write_text("/srv/echo.py", ECHO)
    vm.succeed("(setsid python3 /srv/echo.py >/dev/null 2>&1 &)")
    vm.wait_for_port(7000)
    return vm.forward(7000)


def test_half_close_passes_through(vm: Machine) -> None:
    """The server replies only once it has read to EOF: the client's SHUT_WR must reach it."""
    address = _start_echo(vm)
    payload = os.urandom(3 * 1024 * 1024)
    with socket.create_connection(address, timeout=30) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    assert reply == b"got %d bytes" % len(payload)


def test_connections_past_the_cap_are_closed_and_the_relay_goes_on(
    vm: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay carries at most MAX_CONNECTIONS at once (for expose_host_port the guest picks
    how many it opens): one more is closed at once, and once some end, new ones work again."""
    monkeypatch.setattr(relay, "MAX_CONNECTIONS", 3)
    address = _start_echo(vm)
    held = [socket.create_connection(address, timeout=30) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"x")

        def refused(_: bool) -> bool | None:  # the three are counted once the relay took them
            with socket.create_connection(address, timeout=30) as extra:
                try:
                    return extra.recv(100) == b"" or None
                except ConnectionResetError:
                    return True

        assert poll_until(refused, timeout=10, what="a fourth connection closed by the relay")
    finally:
        for sock in held:
            sock.close()

    def echoed(_: bool) -> bytes | None:
        with socket.create_connection(address, timeout=30) as client:
            try:
                client.sendall(b"again")
                client.shutdown(socket.SHUT_WR)
                return client.recv(100) or None
            except OSError:  # still closed by the relay: the held ones are not all gone yet
                return None

    assert poll_until(echoed, timeout=30, what="a new connection after the held ones ended") == (
        b"got 5 bytes"
    )


def test_after_destroy_the_port_refuses_and_live_connections_end(
    backend: EmulatorBackend, session: Session, template: Snapshot
) -> None:
    spec = MachineSpec(name="gone")
    ref = backend.clone(template, spec, session)
    vm = Machine(backend, ref, spec)
    address = _start_echo(vm)
    live = socket.create_connection(address, timeout=30)
    live.sendall(b"half")
    listeners = [t for t in threading.enumerate() if t.name == "vmenv-forward-7000"]
    assert listeners
    backend.destroy(ref)
    try:
        assert live.recv(100) == b""  # cut, not left hanging on a dead guest
    except ConnectionResetError:
        pass  # cut with its unread bytes: a reset is the same end
    finally:
        live.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()
    with pytest.raises(MachineGone):
        vm.forward(PORT + 1)
    for thread in listeners:
        thread.join(5)
    assert not any(t.is_alive() for t in listeners), "a listener outlived its machine"


def test_a_forward_on_the_ipv6_loopback(vm: Machine) -> None:
    """``host=`` binds the address asked for; the relay still dials the guest's 127.0.0.1."""
    serve_http(vm)
    host, port = vm.forward(PORT, host="::1")
    assert host == "::1"
    assert fetch(f"http://[::1]:{port}/index.html") == b"hello from the guest\n"


def test_a_machine_on_a_network_with_a_server_on_all_addresses(
    backend: EmulatorBackend, session: Session, template: Snapshot
) -> None:
    if not backend.capabilities().network:
        pytest.skip("the emulator's private network needs iproute2 here")
    spec = MachineSpec(name="web", network="lan")
    ref = backend.clone(template, spec, session, Network("lan", uuid.uuid4().hex[:8]))
    try:
        vm = Machine(backend, ref, spec)
        assert vm.ip
        serve_http(vm, bind="0.0.0.0")
        assert fetch(vm.url(PORT)) == b"hello from the guest\n"
    finally:
        backend.destroy(ref)


def test_a_forward_outlives_a_revert(vm: Machine, template: Snapshot) -> None:
    """A revert starts a new PID 1 (a new network namespace): the forward follows it."""
    url = vm.url(PORT, "/index.html")
    vm.revert(template)
    serve_http(vm)
    assert fetch(url) == b"hello from the guest\n"


def test_a_closed_guest_port_closes_the_client_connection(vm: Machine) -> None:
    address = vm.forward(9)  # nothing listens on it in the guest
    with socket.create_connection(address, timeout=30) as client:
        assert client.recv(100) == b""
    with pytest.raises(OSError):  # reset or closed: urllib sent its request into a cut relay
        fetch(vm.url(9))


def test_vm_url_through_the_plugin_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import urllib.request
        import pytest

        @pytest.mark.vm(image="host")
        def test_guest_web(vm):
            vm.succeed(
                "mkdir -p /srv/w && echo plugin > /srv/w/index.html && cd /srv/w && "
                "(setsid python3 -m http.server --bind 127.0.0.1 8080 >/dev/null 2>&1 &)"
            )
            vm.wait_for_port(8080)
            url = vm.url(8080, "index.html")
            assert url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(url, timeout=30) as response:
                assert response.read() == b"plugin\\n"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


AS_NOBODY = """
import socket, sys, urllib.request
from pathlib import Path
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.machine import Machine
from pytest_vmenv.spec import MachineSpec
rootfs, state = sys.argv[1], Path(sys.argv[2])
HTTPD = "httpd -p 127.0.0.1:8000 -h /www"
b = EmulatorBackend(state_dir=state)
s = Session(id="forward-userns", state_dir=state)
spec = MachineSpec(name="u", image=rootfs, image_config={"rootfs": rootfs})
template = b.build_template(spec, "forward-userns", s)
ref = b.clone(template, spec, s)
try:
    vm = Machine(b, ref, spec, state / "scratch")
    vm.succeed("mkdir -p /www && echo rootless > /www/index.html && " + HTTPD)
    vm.wait_for_port(8000)
    url = vm.url(8000, "index.html")
    with urllib.request.urlopen(url, timeout=30) as response:
        print("fetched:", response.read().decode().strip())
    vm.revert(template)
    vm.succeed("mkdir -p /www && echo reverted > /www/index.html && " + HTTPD)
    vm.wait_for_port(8000)
    with urllib.request.urlopen(url, timeout=30) as response:
        print("after revert:", response.read().decode().strip())
    b.destroy(ref)
    try:
        socket.create_connection(vm.forward(8000), timeout=5)
    except ConnectionRefusedError:
        print("refused after destroy")
finally:
    b.close()
    b.remove_template(template)
"""


def test_forward_as_nobody(area: object, nobody: object) -> None:
    """Unprivileged, a helper in the guest's user and network namespaces makes the sockets:
    a busybox httpd on the guest's loopback is fetched, across a revert, and refuses after."""
    runner: Any = nobody
    unprivileged._need_userns(runner)
    where: Any = area  # its busybox rootfs has httpd and mkdir (test_unprivileged.APPLETS)
    res = runner.run(["python", "-c", AS_NOBODY, str(where.rootfs), str(where.state)])
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert lines == ["fetched: rootless", "after revert: reverted", "refused after destroy"], (
        res.stdout,
        res.stderr,
    )
