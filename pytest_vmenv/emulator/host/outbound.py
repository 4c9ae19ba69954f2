"""Outbound NAT for emulator guests (``outbound=True``): one ``slirp4netns`` per guest.

Contract: :meth:`Outbound.attach` gives a running guest a ``tap0`` in its own network
namespace, ``10.0.2.100/24`` with a default route through ``10.0.2.2``, and writes
``nameserver 10.0.2.3`` to its ``/etc/resolv.conf`` (through its PID 1, so the write stays in
the guest's root). Connections the guest opens out are made again by slirp4netns, a user-mode
TCP/IP stack running as pytest's user in pytest's network namespace: they leave as the host's
own connections would, and DNS at ``10.0.2.3`` is forwarded to the host's resolver. Nothing
of the host's interfaces, routes or firewall is changed, and the host's loopback is *not*
reachable (``--disable-host-loopback``: ``10.0.2.2`` is no way to the host's 127.0.0.1;
:meth:`~pytest_vmenv.emulator.EmulatorBackend.expose_host_port` is the one way there). A guest
without ``outbound`` has no route out at all.

Why slirp4netns (over passt/pasta, QEMU's slirp or veth + NAT): it is the user-mode network
rootless Podman and Buildah used for years, Debian 12 ships 1.2.0 (its pasta is a March 2023
snapshot), it runs unprivileged (it joins the guest's user namespace to make the tap), it has
the one switch that keeps the host's loopback out, and it confines itself with a seccomp
filter, and as root with a sandbox (a private mount namespace, capabilities dropped), since
it parses what a hostile guest sends. veth + NAT would need the host's firewall.

Lifetime: slirp4netns gets a pidfd of the guest's PID 1 (unprivileged: of its keeper, which
lives in the same namespaces) as ``--exit-fd``, so it exits when the guest stops, however the
guest stops: destroyed by this process, by the reaper after pytest was killed, or by ``vmenv
gc`` for a kept guest. A kept guest keeps its outbound network after pytest exits. It runs in
a session of its own (a Ctrl-C at the terminal does not reach it) and logs to
``<guest dir>/slirp4netns.log``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import threading
import time

from ... import errors
from .forward import guest_ns
from .pids import pidfd
from .record import Guest
from .state import NAME
from .userns import rootless

__all__ = ["GUEST_ADDRESS", "GUEST_DNS", "Outbound", "problem"]

SLIRP4NETNS = "slirp4netns"
GUEST_ADDRESS = "10.0.2.100"
GUEST_DNS = "10.0.2.3"
READY_TIMEOUT = 10.0
TUN = "/dev/net/tun"
_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _program() -> str | None:
    return shutil.which(SLIRP4NETNS, path=f"{os.environ.get('PATH', '')}:{_SBIN}")


def problem() -> str | None:
    """Why ``outbound=True`` cannot work here (None: it can)."""
    if _program() is None:
        return (
            "outbound=True needs slirp4netns, which is not installed: "
            "`apt-get install --no-install-recommends slirp4netns`"
        )
    if rootless() and not os.access(TUN, os.R_OK | os.W_OK):
        return (
            f"outbound=True unprivileged needs {TUN} open to uid {os.geteuid()} (mode 0666, "
            "as systemd-udev sets it on a standard Debian; this host has it closed): "
            f"`chmod 0666 {TUN}` as root, or run as root"
        )
    return None


class Outbound:
    """The slirp4netns processes this backend instance started, one per guest id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen[bytes]] = {}

    def attach(self, guest: Guest) -> None:
        """Give the running ``guest`` its outbound network (see the module docstring)."""
        program = _program()
        if program is None:
            raise errors.BackendUnavailable(NAME, problem() or SLIRP4NETNS)
        proc = _start(program, guest)
        with self._lock:
            old = self._running.pop(guest.id, None)
            self._running[guest.id] = proc
        if old is not None:
            _reap(old)
        assert guest.conn is not None
        reply = guest.conn.request(
            {"op": "write", "path": "/etc/resolv.conf", "data": f"nameserver {GUEST_DNS}\n",
             "mode": 0o644}
        )  # fmt: skip
        if "error" in reply:
            raise errors.BackendError(
                f"{NAME}: could not write /etc/resolv.conf in {guest.name!r}: {reply['error']}"
            )

    def detach(self, guest: Guest) -> None:
        """Reap ``guest``'s slirp4netns once the guest stopped (it exits on its own)."""
        with self._lock:
            proc = self._running.pop(guest.id, None)
        if proc is not None:
            _reap(proc)

    def close(self) -> None:
        """Reap every slirp4netns whose guest stopped; a kept guest's keeps running."""
        with self._lock:
            procs, self._running = list(self._running.values()), {}
        for proc in procs:
            proc.poll()


def _start(program: str, guest: Guest) -> subprocess.Popen[bytes]:
    """slirp4netns on ``guest``'s namespaces, once it says the tap is configured."""
    unprivileged = rootless()
    watched = (guest.keeper, guest.keeper_start) if unprivileged else (guest.pid, guest.pid_start)
    fds = guest_ns(guest, "user", "net") if unprivileged else guest_ns(guest, "net")
    exit_fd = pidfd(*watched)
    ready_r, ready_w = os.pipe()
    log = os.open(guest.dir / "slirp4netns.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                  | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)  # fmt: skip
    argv = [program, "--configure", "--mtu=65520", "--disable-host-loopback", "--enable-seccomp",
            f"--exit-fd={exit_fd}", f"--ready-fd={ready_w}"]  # fmt: skip
    if unprivileged:  # the sandbox needs CAP_SYS_ADMIN in slirp4netns's own user namespace
        argv.append(f"--userns-path=/proc/self/fd/{fds[0]}")
    else:
        argv.append("--enable-sandbox")
    argv += ["--netns-type=path", f"/proc/self/fd/{fds[-1]}", "tap0"]
    try:
        if exit_fd < 0:
            raise errors.MachineGone(f"{NAME}: machine {guest.name!r} is not running")
        proc = subprocess.Popen(
            argv, pass_fds=(*fds, exit_fd, ready_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip
    finally:
        for fd in (*fds, exit_fd, ready_w, log):
            if fd >= 0:
                os.close(fd)
    try:
        _wait_ready(ready_r, proc, guest)
    except BaseException:
        _reap(proc, kill=True)
        raise
    finally:
        os.close(ready_r)
    return proc


def _wait_ready(ready: int, proc: subprocess.Popen[bytes], guest: Guest) -> None:
    """Return once slirp4netns wrote its ready byte; raise with its log if it did not."""
    deadline = time.monotonic() + READY_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if select.select([ready], [], [], left)[0]:
            if os.read(ready, 1) == b"1":
                return
            break  # EOF: it exited before it was ready
    proc.poll()
    log = ""
    with contextlib.suppress(OSError):
        log = (guest.dir / "slirp4netns.log").read_text(errors="replace")[-2000:].strip()
    said = f" (exit status {proc.returncode})" if proc.returncode is not None else " in time"
    raise errors.BackendError(
        f"{NAME}: the outbound network of {guest.name!r} did not start: slirp4netns was not "
        f"ready{said}. It said: {log or '(nothing)'}"
    )


def _reap(proc: subprocess.Popen[bytes], kill: bool = False) -> None:
    """Wait for ``proc`` (ours, by its Popen); SIGKILL it if it does not exit in 2 s."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        proc.wait(2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
