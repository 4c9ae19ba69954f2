"""A stand-in for "the outside" that an ``outbound=True`` test may reach: run as root under
``unshare --net --mount``, so everything here is in a network namespace the test made.

``python uplink.py WORKDIR -- ARGV...`` brings up ``lo`` and a veth pair (both ends here),
with 192.0.2.1/24 (TEST-NET-1) on ``up0`` and a default route through it; points
``/etc/resolv.conf`` (a bind mount in this private mount namespace) at a dnsmasq on
192.0.2.1 that answers ``archive.test`` with 192.0.2.1; serves WORKDIR/www on
``http://192.0.2.1:8080/`` and WORKDIR/loopback on this namespace's ``127.0.0.1:8081`` (the
loopback a guest must not reach); then runs ARGV (a pytest, maybe through ``setpriv``) and
exits with its status. The guest's slirp4netns runs in this namespace too, so its
connections end here and never reach the host's network.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

ADDRESS = "192.0.2.1"
NAME = "archive.test"
PORT = 8080
LOOPBACK_CANARY_PORT = 8081


def _serve(address: str, port: int, root: Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((address, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main() -> int:
    work = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    script = (
        "link set lo up\nlink add up0 type veth peer name up1\n"
        f"addr add {ADDRESS}/24 dev up0\nlink set up0 up\nlink set up1 up\n"
        "route add default dev up0\n"
    )
    subprocess.run(["ip", "-batch", "-"], input=script, text=True, check=True)
    resolv = work / "resolv.conf"
    resolv.write_text(f"nameserver {ADDRESS}\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    dns = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
         f"--listen-address={ADDRESS}", f"--address=/{NAME}/{ADDRESS}", "--pid-file=",
         "--user=nobody", "--group=nogroup", "--log-facility=-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _serve(ADDRESS, PORT, work / "www")
        _serve("127.0.0.1", LOOPBACK_CANARY_PORT, work / "loopback")
        return subprocess.run(argv, env=os.environ.copy()).returncode
    finally:
        dns.kill()
        dns.wait()


if __name__ == "__main__":
    sys.exit(main())
