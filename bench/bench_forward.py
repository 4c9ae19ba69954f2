"""Forward benchmark: a request through ``vm.forward`` against the same server on the host's
own loopback.

    python bench/bench_forward.py [--rounds 5] [--requests 200] [--mib 100]    # as root

One emulator guest of the ``host`` image runs ``python3 -m http.server`` on its own 127.0.0.1
and a byte streamer (a connection gets ``--mib`` MiB of zeros); the host runs the very same
two programs (the same ``/usr/bin/python3``) on its loopback, in processes of their own, so
the only difference is the relay. Files go to ``<state dir>/bench-forward``.

Per round, interleaved (forward, then direct):

* latency: the median of ``--requests`` small GETs, each on a new connection (``http.server``
  speaks HTTP/1.0: a connection per request, as ``urllib`` does), so every request pays the
  relay's connection setup (a thread joining the guest's netns) too;
* HTTP throughput: MiB/s of one ``--mib`` MiB download from ``http.server``;
* stream throughput: MiB/s of ``--mib`` MiB from the streamer (the relay's own ceiling, with
  ``http.server``'s Python copy loop out of the figure);
* first byte: from calling ``forward()`` on a port not forwarded yet to the first byte of the
  reply to a GET (listener set up, connection relayed, server answered);
* exposed latency: the median of ``--requests`` small GETs made *in the guest* by one
  ``python3`` client, through ``expose_host_port`` to the host's ``http.server``, against the
  same client and program on the guest's own loopback (the guest's server: direct).

Printed: each figure as a range over the rounds (min-max of the round values, and their
median), and the forward/direct ratios taken within a round. Targets: latency
within 2x, throughput at least 50% of direct. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pytest_vmenv.backend import MachineRef, Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

PYTHON = "/usr/bin/python3"
HTTP_PORT, STREAM_PORT = 8000, 8001
STREAMER = r"""
import socket, sys, threading
port, mib = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_server(("127.0.0.1", port))
print(s.getsockname()[1], flush=True)
block = bytes(1 << 20)
def send(c):
    with c:
        c.recv(16)
        for _ in range(mib):
            c.sendall(block)
while True:
    threading.Thread(target=send, args=(s.accept()[0],), daemon=True).start()
"""
LATENCY = r"""
import http.client, statistics, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
def get():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/small")
    c.getresponse().read()
    c.close()
for _ in range(20):
    get()
times = []
for _ in range(n):
    start = time.perf_counter()
    get()
    times.append(time.perf_counter() - start)
print(statistics.median(times))
"""


def _get(address: tuple[str, int], path: str) -> int:
    """Bytes of the body of ``GET path`` on a new connection."""
    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        total = 0
        while chunk := response.read(1 << 20):
            total += len(chunk)
        return total
    finally:
        conn.close()


def _latency(address: tuple[str, int], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        _get(address, "/small")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _http_mibs(address: tuple[str, int]) -> float:
    start = time.perf_counter()
    size = _get(address, "/big")
    return size / (1 << 20) / (time.perf_counter() - start)


def _stream_mibs(address: tuple[str, int]) -> float:
    start = time.perf_counter()
    total = 0
    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(b"go")
        buf = bytearray(1 << 20)
        while n := sock.recv_into(buf):
            total += n
    return total / (1 << 20) / (time.perf_counter() - start)


def _first_byte(backend: EmulatorBackend, ref: MachineRef, port: int) -> float:
    start = time.perf_counter()
    address = backend.forward(ref, port)
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(b"GET /small HTTP/1.0\r\n\r\n")
        sock.recv(1)
    return time.perf_counter() - start


def _host_servers(www: Path, mib: int) -> tuple[list[subprocess.Popen[str]], dict[str, int]]:
    """The same two servers on the host's loopback: their processes and ports."""
    http_server = subprocess.Popen(
        [PYTHON, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"],
        cwd=www, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    streamer = subprocess.Popen(
        [PYTHON, "-c", STREAMER, "0", str(mib)], stdout=subprocess.PIPE, text=True
    )
    assert http_server.stdout is not None and streamer.stdout is not None
    line = http_server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://...)"
    ports = {
        "http": int(line.split(" port ")[1].split()[0]),
        "stream": int(streamer.stdout.readline()),
    }
    return [http_server, streamer], ports


def _guest_servers(backend: EmulatorBackend, ref: MachineRef, mib: int) -> None:
    def sh(command: str) -> None:
        result = backend.execute(ref, ["/bin/sh", "-c", command], timeout=120)
        assert result.exit_code == 0, (command, result)

    sh(f"mkdir -p /srv/www && cd /srv/www && head -c 200 /dev/zero > small && "
       f"head -c {mib << 20} /dev/zero > big")  # fmt: skip
    backend.copy_in(ref, _write(backend, "streamer.py", STREAMER), "/srv/streamer.py")
    backend.copy_in(ref, _write(backend, "latency.py", LATENCY), "/srv/latency.py")
    sh(f"cd /srv/www && (setsid {PYTHON} -m http.server --bind 127.0.0.1 {HTTP_PORT} "
       f">/dev/null 2>&1 &) && (setsid {PYTHON} /srv/streamer.py {STREAM_PORT} {mib} "
       ">/dev/null 2>&1 &) && for i in $(seq 100); do "
       f"grep -q ':{HTTP_PORT:04X} 00000000:0000 0A' /proc/net/tcp && "
       f"grep -q ':{STREAM_PORT:04X} 00000000:0000 0A' /proc/net/tcp && exit 0; sleep 0.05; "
       "done; exit 1")  # fmt: skip


def _write(backend: EmulatorBackend, name: str, text: str) -> Path:
    path = backend.state_dir / "bench-forward" / name
    path.write_text(text)
    return path


def _show(label: str, values: list[float], unit: str, scale: float = 1.0) -> None:
    lo, mid, hi = min(values) * scale, statistics.median(values) * scale, max(values) * scale
    print(f"  {label:<34} {lo:9.2f} - {hi:9.2f} {unit:<5} (median {mid:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--mib", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_forward.py needs root (the host image and vm.forward)")
    work = state_dir() / "bench-forward"
    shutil.rmtree(work, ignore_errors=True)
    www = work / "www"
    www.mkdir(parents=True)
    (www / "small").write_bytes(bytes(200))
    with open(www / "big", "wb") as f:
        f.truncate(args.mib << 20)
    backend = EmulatorBackend(state_dir=state_dir())
    session = Session(id=f"bench-forward-{uuid.uuid4().hex[:8]}", state_dir=state_dir())
    spec = MachineSpec(name="bench")
    template = backend.build_template(spec, f"bench-forward-{session.id}", session)
    procs: list[subprocess.Popen[str]] = []
    try:
        ref = backend.clone(template, spec, session)
        _guest_servers(backend, ref, args.mib)
        procs, ports = _host_servers(www, args.mib)
        forward = {
            "http": backend.forward(ref, HTTP_PORT),
            "stream": backend.forward(ref, STREAM_PORT),
        }
        direct = {k: ("127.0.0.1", v) for k, v in ports.items()}
        forward["exposed"] = backend.expose_host_port(ref, ports["http"])
        direct["exposed"] = ("127.0.0.1", HTTP_PORT)  # the guest's own server
        _rounds(args, backend, ref, forward, direct)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        backend.close()
        backend.remove_template(template)
        shutil.rmtree(work, ignore_errors=True)


def _rounds(
    args: argparse.Namespace,
    backend: EmulatorBackend,
    ref: MachineRef,
    forward: dict[str, tuple[str, int]],
    direct: dict[str, tuple[str, int]],
) -> None:
    figures: dict[str, list[float]] = {}

    def measure(name: str, probe: Callable[[tuple[str, int]], float], kind: str) -> None:
        through, plain = probe(forward[kind]), probe(direct[kind])
        figures.setdefault(f"{name} forward", []).append(through)
        figures.setdefault(f"{name} direct", []).append(plain)
        figures.setdefault(f"{name} ratio", []).append(through / plain)

    for address in (forward["http"], direct["http"]):
        _latency(address, 20)  # warm both paths
    for i in range(args.rounds):
        measure("latency", lambda a: _latency(a, args.requests), "http")
        measure("http", _http_mibs, "http")
        measure("stream", _stream_mibs, "stream")
        figures.setdefault("first byte", []).append(_first_byte_fresh(backend, ref, i))
        measure("exposed", lambda a: _guest_latency(backend, ref, a[1], args.requests), "exposed")
    print(f"forward benchmark: {args.rounds} rounds, {args.requests} requests, {args.mib} MiB")
    _show("small GET latency, forward", figures["latency forward"], "ms", 1e3)
    _show("small GET latency, direct", figures["latency direct"], "ms", 1e3)
    _show("latency ratio (target <= 2.0)", figures["latency ratio"], "x")
    _show("http.server download, forward", figures["http forward"], "MiB/s")
    _show("http.server download, direct", figures["http direct"], "MiB/s")
    _show("http throughput ratio (>= 0.5)", figures["http ratio"], "x")
    _show("byte stream, forward", figures["stream forward"], "MiB/s")
    _show("byte stream, direct", figures["stream direct"], "MiB/s")
    _show("stream throughput ratio (>= 0.5)", figures["stream ratio"], "x")
    _show("forward() to first byte", figures["first byte"], "ms", 1e3)
    _show("in-guest GET, expose_host_port", figures["exposed forward"], "ms", 1e3)
    _show("in-guest GET, guest loopback", figures["exposed direct"], "ms", 1e3)
    _show("exposed latency ratio", figures["exposed ratio"], "x")


def _guest_latency(backend: EmulatorBackend, ref: MachineRef, port: int, n: int) -> float:
    """The median small GET from a client in the guest to its ``127.0.0.1:port``."""
    argv = [PYTHON, "/srv/latency.py", str(port), str(n)]
    result = backend.execute(ref, argv, timeout=300)
    assert result.exit_code == 0, result
    return float(result.stdout)


def _first_byte_fresh(backend: EmulatorBackend, ref: MachineRef, i: int) -> float:
    """``forward()`` to first byte on a port never forwarded: a new ``http.server`` in the
    guest, started and listening before the clock starts."""
    port = 9000 + i
    result = backend.execute(
        ref,
        ["/bin/sh", "-c",
         f"cd /srv/www && (setsid {PYTHON} -m http.server --bind 127.0.0.1 {port} "
         f">/dev/null 2>&1 &) && for i in $(seq 100); do grep -q ':{port:04X} 00000000:0000 0A' "
         "/proc/net/tcp && exit 0; sleep 0.05; done; exit 1"],
        timeout=30,
    )  # fmt: skip
    assert result.exit_code == 0, result
    return _first_byte(backend, ref, port)


if __name__ == "__main__":
    main()
