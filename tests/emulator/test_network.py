"""Real-namespace tests of the emulator's private network (:mod:`.host.bridge`).

Guests are stand-ins: small processes that ``unshare(CLONE_NEWNET)`` and wait on stdin. The
tests prove what a user relies on: two machines on one Lan talk TCP, a machine reaches nothing
beyond the Lan, the host's own network is never changed, and nothing is left running.
No traffic is sent to any address outside the guests' loopback and the Lan itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_vmenv.emulator.host import bridge as network
from pytest_vmenv.emulator.host.bridge import Lan
from pytest_vmenv.errors import BackendError, ConfigError, MachineGone

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
    reason="needs root (network namespaces) and iproute2's `ip` and util-linux's `nsenter`",
)

PY = sys.executable
GUEST = r"""
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
    sys.exit("unshare(CLONE_NEWNET) failed")
print("ready", flush=True)
sys.stdin.read()
"""
ECHO_SERVER = r"""
import socket, sys
s = socket.create_server((sys.argv[1], 7777))
s.settimeout(10)
print("listening", flush=True)
c, peer = s.accept()
c.settimeout(10)
c.sendall(b"echo:" + c.recv(1024))
print(peer[0], flush=True)
"""
CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
c.sendall(b"hello")
print(c.recv(1024).decode())
"""


def sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}: {result.stderr}")
    return result


def in_ns(pid: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", "-t", str(pid), "-n", *argv, check=check)


def host_network() -> dict[str, list[str]]:
    """What the host's namespace shows: links, addresses, routes and netns ids; without the
    libvirt backend's bridges (``vmbr*``) and domain taps (``vnet*``), which CI's libvirt lane
    makes and removes meanwhile."""

    def lines(*argv: str) -> list[str]:
        out = sh(*argv).stdout.splitlines()
        return [ln for ln in out if not _LIBVIRT.search(ln)]

    return {
        "link": lines("ip", "-o", "link"),
        "addr": lines("ip", "-o", "addr"),
        "route4": lines("ip", "-4", "route", "show", "table", "all"),
        "route6": lines("ip", "-6", "route", "show", "table", "all"),
        "nsid": lines("ip", "netns", "list-id"),
    }


_LIBVIRT = re.compile(r"\b(vmbr[0-9a-f]+|vnet[0-9]+)\b")


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start processes that are killed (by pid) and reaped when the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def start(*argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop(proc)


@pytest.fixture
def guest(spawn: Callable[..., subprocess.Popen[str]]) -> Callable[[], int]:
    """Start a fake guest in a network namespace of its own; return its pid."""

    def start() -> int:
        proc = spawn(PY, "-I", "-S", "-c", GUEST)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
        return proc.pid

    return start


@pytest.fixture
def lan() -> Iterator[Lan]:
    segment = Lan("10.77.0.0/24")
    yield segment
    segment.close()


def test_two_guests_talk_tcp(
    lan: Lan, guest: Callable[[], int], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    a, b = guest(), guest()
    started = time.perf_counter()
    ip_a = lan.attach(a)
    took = time.perf_counter() - started
    ip_b = lan.attach(b)
    print(f"attach took {took * 1000:.1f} ms")
    assert (ip_a, ip_b) == ("10.77.0.2", "10.77.0.3")
    assert took < 2.0

    addr = in_ns(b, "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
    assert "inet 10.77.0.3/24" in addr
    assert "state UP" in in_ns(b, "ip", "link", "show", "eth0").stdout

    server = spawn("nsenter", "-t", str(b), "-n", PY, "-I", "-S", "-c", ECHO_SERVER, ip_b)
    assert server.stdout is not None
    assert server.stdout.readline() == "listening\n"
    reply = in_ns(a, PY, "-I", "-S", "-c", CLIENT, ip_b, "7777")
    assert reply.stdout.strip() == "echo:hello"
    assert server.stdout.readline().strip() == ip_a  # the server saw A's Lan address
    assert server.wait(timeout=10) == 0


def test_guest_reaches_nothing_beyond_the_lan(lan: Lan, guest: Callable[[], int]) -> None:
    a = guest()
    lan.attach(a)

    routes = in_ns(a, "ip", "-4", "route").stdout.strip().splitlines()
    assert len(routes) == 1 and routes[0].startswith("10.77.0.0/24 dev eth0"), routes
    assert "default" not in in_ns(a, "ip", "-6", "route").stdout
    # A route lookup only, no packet: a documentation address has no route from the guest.
    lookup = in_ns(a, "ip", "route", "get", "192.0.2.1", check=False)
    assert lookup.returncode != 0 and "unreachable" in lookup.stderr.lower()

    # A service on the host's loopback is not reachable: the guest's 127.0.0.1 is its own.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        attempt = in_ns(a, PY, "-I", "-S", "-c", CLIENT, "127.0.0.1", str(port), check=False)
        assert attempt.returncode != 0
        assert "ConnectionRefusedError" in attempt.stderr
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()

    # The bridge's namespace has no address but loopback and no route at all.
    holder = lan.holder_pid
    assert holder is not None
    addresses = in_ns(holder, "ip", "-o", "-4", "addr").stdout.strip().splitlines()
    assert [line.split()[1] for line in addresses] == ["lo"]
    assert in_ns(holder, "ip", "-4", "route").stdout.strip() == ""


def test_host_network_is_never_changed(guest: Callable[[], int]) -> None:
    before = host_network()
    segment = Lan("10.78.0.0/24")
    try:
        a, b = guest(), guest()
        segment.attach(a)
        segment.attach(b)
        assert host_network() == before
        segment.detach(a)
        assert host_network() == before
    finally:
        segment.close()
    assert host_network() == before


def test_close_leaves_nothing_running(guest: Callable[[], int]) -> None:
    a = guest()
    segment = Lan()
    holder = segment.holder_pid
    assert holder is not None and not gone(holder)
    segment.attach(a)
    segment.close()
    assert gone(holder) and not Path(f"/proc/{holder}").exists()  # killed and reaped
    assert segment.holder_pid is None
    # The namespace went with the holder, and the guest's end of the veth with it.
    assert wait_for(lambda: "eth0" not in in_ns(a, "ip", "-o", "link").stdout)
    segment.close()  # idempotent
    segment.detach(a)
    with pytest.raises(BackendError, match="closed"):
        segment.attach(a)


def test_holder_exits_when_its_owner_dies(
    spawn: Callable[..., subprocess.Popen[str]],
) -> None:
    repo = str(Path(__file__).resolve().parents[2])
    owner = spawn(
        PY,
        "-c",
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from pytest_vmenv.emulator.host.bridge import Lan;"
        "print(Lan().holder_pid, flush=True); time.sleep(60)",
        repo,
    )
    assert owner.stdout is not None
    holder = int(owner.stdout.readline())
    assert not gone(holder)
    os.kill(owner.pid, signal.SIGKILL)  # no close(), no finalizer: pytest crashed
    owner.wait(timeout=10)
    assert wait_for(lambda: gone(holder), timeout=5), f"holder {holder} outlived its owner"


def test_detach_is_idempotent_and_addresses_are_reused(
    lan: Lan, guest: Callable[[], int], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    a, b = guest(), guest()
    assert lan.attach(a) == "10.77.0.2"
    assert lan.attach(b) == "10.77.0.3"
    lan.detach(a)
    lan.detach(a)
    lan.detach(424242)  # never attached
    assert "eth0" not in in_ns(a, "ip", "-o", "link").stdout
    holder = lan.holder_pid
    assert holder is not None
    assert in_ns(holder, "ip", "-o", "link").stdout.count("master br0") == 1
    assert lan.attach(a) == "10.77.0.2"  # lowest free address again

    c = guest()
    assert lan.attach(c) == "10.77.0.4"
    os.kill(c, signal.SIGKILL)  # a guest that died before detach
    assert wait_for(lambda: gone(c))
    lan.detach(c)
    assert wait_for(lambda: in_ns(holder, "ip", "-o", "link").stdout.count("master br0") == 2)


def test_concurrent_attach_from_threads(lan: Lan, guest: Callable[[], int]) -> None:
    pids = [guest() for _ in range(8)]
    results: dict[int, str] = {}
    errors: list[Exception] = []

    def attach(pid: int) -> None:
        try:
            results[pid] = lan.attach(pid)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=attach, args=(pid,)) for pid in pids]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    took = time.perf_counter() - started
    print(f"8 concurrent attaches took {took * 1000:.1f} ms")
    assert not errors
    assert sorted(results.values()) == [f"10.77.0.{n}" for n in range(2, 10)]
    for pid, address in results.items():
        assert f"inet {address}/24" in in_ns(pid, "ip", "-o", "-4", "addr").stdout


def test_errors_are_backend_errors_with_the_command(
    lan: Lan, guest: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = host_network()
    with pytest.raises(BackendError, match="own"):
        lan.attach(os.getpid())  # would put eth0 into the host's namespace
    with pytest.raises(MachineGone):
        lan.attach(2**22 + 7)  # above pid_max: cannot exist

    a = guest()
    lan.attach(a)
    with pytest.raises(BackendError, match="already attached"):
        lan.attach(a)
    # A second eth0 in the same guest: the command fails, and the error shows it.
    with Lan("10.79.0.0/24") as other, pytest.raises(BackendError) as info:
        other.attach(a)
    message = str(info.value)
    assert "link add" in message and f"netns {a}" in message and "File exists" in message
    assert "already has an eth0" in message
    assert host_network() == before

    with pytest.raises(ConfigError, match=r"10\.77\.0\.1/24"):
        Lan("10.77.0.1/24")
    with pytest.raises(ConfigError, match="IPv4"):
        Lan("fd00::/64")

    monkeypatch.setattr(network, "_TOOL_DIRS", ())
    monkeypatch.setenv("PATH", str(Path(__file__).parent))
    with pytest.raises(BackendError, match="iproute2"):
        Lan()


def test_state_record_lives_while_open() -> None:
    from pytest_vmenv.paths import state_dir

    where = state_dir() / f"test-network-{uuid.uuid4().hex}"
    try:
        with Lan(state_dir=where) as segment:
            record = where / f"lan-{segment.holder_pid}.json"
            assert f'"holder_pid": {segment.holder_pid}' in record.read_text()
        assert not record.exists()
    finally:
        shutil.rmtree(where, ignore_errors=True)
