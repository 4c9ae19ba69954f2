"""Private networks for emulator guests: one Linux bridge per environment, in its own netns.

A :class:`Lan` is the L2 segment the machines of one environment share. Design, and why:

* **The bridge lives in a network namespace of its own**, never in the host's. A bridge in
  the host's namespace would be visible to (and routable from) the host, would need unique
  names across concurrent sessions, and would be left behind if pytest were killed. A bridge
  in a private namespace has none of those problems: the namespace, the bridge and every
  veth end in it vanish together when the namespace's last reference goes away.
* **A small holder process keeps that namespace alive.** It is a ``python -I -S`` child that
  calls ``unshare(CLONE_NEWNET)`` (via ctypes: ``os.unshare`` is Python 3.12+), brings ``lo``
  and the bridge up with one ``ip -batch``, reports ``ready`` and then only waits. It exits
  on its own when its stdin pipe reaches EOF or its parent process changes, i.e. when pytest
  dies however it dies, so nothing outlives the pytest process. ``PR_SET_PDEATHSIG`` is not
  used: it fires when the *thread* that forked the child exits, and ``Lan`` may be created
  from a worker thread. The holder runs in its own session, so a Ctrl-C on the terminal does
  not tear the network away under finalizers that still need it.
* **Nothing touches the host's network namespace.** Each veth pair is created by ``ip``
  running inside the bridge namespace (``nsenter -t HOLDER -n``); the kernel creates the peer
  directly in the guest's namespace (``peer name eth0 netns GUESTPID``), so no interface,
  address, route or netns id is ever created in the host's namespace, not even transiently.
  The guest side is then configured with ``nsenter -t GUEST -n ip -batch``. No default route
  and no address on the bridge: the segment reaches nothing but its own members.
* **Two short subprocesses per attach** (one ``ip`` in each namespace; ``nsenter`` execs
  ``ip`` without forking), a few milliseconds in all: attach is on a test's setup path.
* Guests get the hosts of ``cidr`` from the second one on (``.2``, ``.3``, ...); the first
  (``.1``) is left for a gateway-like role the bridge does not take. Freed addresses are
  reused lowest-first. One lock serialises attach/detach/close; the kernel serialises
  link changes under its RTNL lock anyway, so a finer lock would buy nothing.

If ``state_dir`` is given, a ``lan-<holder pid>.json`` record (holder pid and start time,
owner pid, cidr) is kept there while the Lan is open, so a sweeper can find a holder whose
owner vanished without relying on the holder's own exit. Nothing is ever written to /tmp.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ...errors import BackendError, MachineGone
from .lanaddress import free_address, subnet

__all__ = ["Lan"]

_BRIDGE = "br0"
_GUEST_IF = "eth0"
_TIMEOUT = 30.0
_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

# The holder: enter a new netns, build the bridge, say "ready", then wait for EOF on stdin
# or for the parent to go away. Failures are reported as one "error ..." line on stdout.
_HOLDER = r"""
import ctypes, os, select, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
ip, bridge = sys.argv[1], sys.argv[2]
parent = os.getppid()
def fail(msg):
    sys.stdout.write("error " + msg.replace("\n", " | ") + "\n")
    sys.stdout.flush()
    sys.exit(1)
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:
    fail("unshare(CLONE_NEWNET): " + os.strerror(ctypes.get_errno())
         + " (creating a network namespace needs root or CAP_SYS_ADMIN)")
script = ("link set lo up\n"
          "link add " + bridge + " type bridge forward_delay 0 stp_state 0\n"
          "link set " + bridge + " up\n")
try:
    r = subprocess.run([ip, "-batch", "-"], input=script, capture_output=True, text=True,
                       timeout=30)
except Exception as e:
    fail("%s -batch -: %s" % (ip, e))
if r.returncode != 0:
    fail("%s -batch - exited %d: %s (script: %s)" % (ip, r.returncode, r.stderr.strip(),
                                                    script.strip()))
sys.stdout.write("ready\n")
sys.stdout.flush()
while os.getppid() == parent:
    if select.select([0], [], [], 1.0)[0] and not os.read(0, 4096):
        break
"""


@dataclass(frozen=True)
class _Port:
    ifname: str
    address: ipaddress.IPv4Address


def _tool(name: str, package: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_TOOL_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise BackendError(
            f"the emulator's private network needs {name!r}, which is not installed or not "
            f"on PATH; install {package} (e.g. `apt-get install {package}`)"
        )
    return found


def _netns_id(pid: int | str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/net")
    return st.st_dev, st.st_ino


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


class Lan:
    """A private L2 segment for the machines of one environment: a Linux bridge that lives in
    its own network namespace (never the host's), held open by a small helper process.

    ``attach(pid)`` gives the network namespace of process ``pid`` an ``eth0`` on the segment
    and returns its address; ``detach(pid)`` removes it; ``close()`` removes the segment and
    every veth on it. All three may be called from any thread; ``detach`` and ``close`` are
    idempotent. Failures raise :class:`~pytest_vmenv.errors.BackendError` naming the command
    and its stderr.
    """

    def __init__(self, cidr: str = "10.77.0.0/24", state_dir: Path | None = None) -> None:
        network = subnet(cidr)
        self._network = network
        self._ip = _tool("ip", "iproute2")
        self._nsenter = _tool("nsenter", "util-linux")
        self._lock = threading.Lock()
        self._ports: dict[int, _Port] = {}
        self._counter = 0
        self._record: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = self._start_holder()
        self._holder_pid = self._proc.pid
        if state_dir is not None:
            self._write_record(Path(state_dir))

    @property
    def cidr(self) -> str:
        """The segment's subnet, normalised (``"10.77.0.0/24"``)."""
        return str(self._network)

    @property
    def holder_pid(self) -> int | None:
        """Pid of the process holding the bridge's namespace; ``None`` once closed."""
        return self._holder_pid if self._proc is not None else None

    def __repr__(self) -> str:
        state = f"holder={self._holder_pid}" if self._proc is not None else "closed"
        return f"<Lan {self.cidr} {state} guests={len(self._ports)}>"

    # -- lifecycle -------------------------------------------------------------------------

    def _start_holder(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-I", "-S", "-c", _HOLDER, self._ip, _BRIDGE]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env={"PATH": os.pathsep.join(_TOOL_DIRS), "LC_ALL": "C"},
            )
        except OSError as exc:
            raise BackendError(f"cannot start the network holder {sys.executable}: {exc}") from None
        assert proc.stdout is not None and proc.stderr is not None
        line = b""
        deadline = time.monotonic() + _TIMEOUT
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            poll = select.poll()
            poll.register(proc.stdout.fileno(), select.POLLIN)
            if poll.poll(int(max(0.0, deadline - time.monotonic()) * 1000) + 1):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        if line == b"ready\n":
            proc.stdout.close()
            proc.stderr.close()
            return proc
        self._reap(proc)
        stderr = proc.stderr.read().decode("utf-8", "replace").strip()
        proc.stdout.close()
        proc.stderr.close()
        what = line.decode("utf-8", "replace").strip().removeprefix("error ")
        if not what:
            what = f"no answer within {_TIMEOUT:g}s" if proc.returncode is None else "no answer"
        raise BackendError(
            f"cannot create the private network {self.cidr}: {what}"
            + (f"; holder exited with {proc.returncode}" if proc.returncode is not None else "")
            + (f"; stderr: {stderr}" if stderr else "")
        )

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_TIMEOUT)

    def _write_record(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = state_dir / f"lan-{self._holder_pid}.json"
        data = {
            "holder_pid": self._holder_pid,
            "holder_start_time": _start_time(self._holder_pid),
            "owner_pid": os.getpid(),
            "cidr": self.cidr,
            "bridge": _BRIDGE,
        }
        tmp = record.with_suffix(".json.part")
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            tmp.replace(record)
        except OSError as exc:
            self.close()
            raise BackendError(f"cannot write the network record {record}: {exc}") from None
        self._record = record

    def close(self) -> None:
        """Remove the segment: kill the holder (its namespace, bridge and veths go with it)."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._ports.clear()
            if proc is not None:
                self._reap(proc)
            if self._record is not None:
                self._record.unlink(missing_ok=True)
                self._record = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- guests ----------------------------------------------------------------------------

    def attach(self, guest_pid: int) -> str:
        """Give the netns of ``guest_pid`` an ``eth0`` on this segment; return its address."""
        with self._lock:
            holder = self._live_holder()
            if guest_pid in self._ports:
                raise BackendError(
                    f"process {guest_pid} is already attached to {self.cidr} as "
                    f"{self._ports[guest_pid].address}; detach it first"
                )
            self._check_guest(guest_pid, holder)
            address = self._free_address()
            self._counter += 1
            port = _Port(f"v{self._counter}", address)
            self._run(
                [self._nsenter, "-t", str(holder), "-n", self._ip, "link", "add", port.ifname,
                 "master", _BRIDGE, "up", "type", "veth",
                 "peer", "name", _GUEST_IF, "netns", str(guest_pid)],
                hints={
                    "File exists": f"process {guest_pid}'s network namespace already has an "
                    f"{_GUEST_IF} (attached to another network?); detach it there first",
                    "No such process": f"process {guest_pid} exited meanwhile",
                },
            )  # fmt: skip
            try:
                self._run(
                    [self._nsenter, "-t", str(guest_pid), "-n", self._ip, "-batch", "-"],
                    input=(
                        f"address add {address}/{self._network.prefixlen} dev {_GUEST_IF}\n"
                        f"link set {_GUEST_IF} up\n"
                        "link set lo up\n"
                    ),
                )
            except BaseException:
                self._delete(holder, port.ifname)
                raise
            self._ports[guest_pid] = port
            return str(address)

    def detach(self, guest_pid: int) -> None:
        """Remove the veth of ``guest_pid``; a guest never attached or already dead is fine."""
        with self._lock:
            port = self._ports.pop(guest_pid, None)
            if port is None or self._proc is None or self._proc.poll() is not None:
                return
            try:
                self._delete(self._proc.pid, port.ifname)
            except BackendError:
                self._ports[guest_pid] = port  # still there: a retry retries
                raise

    def _delete(self, holder: int, ifname: str) -> None:
        # Deleting our end deletes the pair; when the guest's netns died first, the kernel
        # has already removed (or is removing) both ends.
        try:
            self._run([self._nsenter, "-t", str(holder), "-n", self._ip, "link", "del", ifname])
        except BackendError as exc:
            if "Cannot find device" not in str(exc):
                raise

    def _live_holder(self) -> int:
        if self._proc is None:
            raise BackendError(f"the private network {self.cidr} is closed")
        if self._proc.poll() is not None:
            raise BackendError(
                f"the holder of the private network {self.cidr} (pid {self._proc.pid}) exited "
                f"unexpectedly with {self._proc.returncode}; the network is gone"
            )
        return self._proc.pid

    def _check_guest(self, guest_pid: int, holder: int) -> None:
        try:
            guest_ns = _netns_id(guest_pid)
        except FileNotFoundError:
            raise MachineGone(
                f"cannot attach process {guest_pid} to {self.cidr}: it does not exist"
            ) from None
        except OSError as exc:
            raise BackendError(
                f"cannot inspect the network namespace of {guest_pid}: {exc}"
            ) from None
        own = {_netns_id("self"), _netns_id(holder)}
        with contextlib.suppress(OSError):
            own.add(_netns_id(1))
        if guest_ns in own:
            raise BackendError(
                f"process {guest_pid} shares a network namespace with pytest, init or the "
                f"bridge of {self.cidr}; a guest must run in its own (unshare CLONE_NEWNET) "
                "before it is attached, or the host's network would be changed"
            )  # fmt: skip

    def _free_address(self) -> ipaddress.IPv4Address:
        return free_address(self._network, {port.address for port in self._ports.values()})

    def _run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        shown = " ".join(argv) + (f" <<< {input.strip()!r}" if input else "")
        try:
            result = subprocess.run(
                argv,
                check=False,
                input=input,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                env={"PATH": os.pathsep.join(_TOOL_DIRS), "LC_ALL": "C"},
            )
        except subprocess.TimeoutExpired:
            raise BackendError(f"timed out after {_TIMEOUT:g}s: {shown}") from None
        except OSError as exc:
            raise BackendError(f"cannot run {shown}: {exc}") from None
        if result.returncode != 0:
            hint = next((h for key, h in (hints or {}).items() if key in result.stderr), "")
            raise BackendError(
                f"exit status {result.returncode}: {shown}\n  stderr: {result.stderr.strip()}"
                + (f"\n  hint: {hint}" if hint else "")
            )
