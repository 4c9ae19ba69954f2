"""Sockets made in an unprivileged guest's network namespace by a helper process.

Unprivileged, pytest may not ``setns`` into a guest's network namespace: that needs
CAP_SYS_ADMIN in the caller's own user namespace too. A process that first joins the guest's
*user* namespace (allowed to the user that made it, but only to a single-threaded process) has
every capability there, and then may join the guest's network namespace. So a small helper,
``python -I -S -c``, single-threaded, does exactly that and then, for each byte it reads on a
socket pair, makes a TCP socket and passes it back (``SCM_RIGHTS``): a socket keeps the
namespace it was made in, so pytest connects and relays with it as with one made by ``setns``.

The helper gets the namespaces as fds opened by pytest from the guest's verified PID 1
(:func:`.forward.guest_netns`), so it never names a pid. It exits when its socket pair closes
(pytest closed the forward, or died).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

from ... import errors
from .state import NAME

__all__ = ["Helper", "spawn"]

_SCRIPT = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
chan, user, net = (int(a) for a in sys.argv[1:4])
for fd, kind in ((user, 0x10000000), (net, 0x40000000)):
    if libc.setns(fd, kind) != 0:
        err = ctypes.get_errno()
        os.write(2, ("setns(%#x): %s\n" % (kind, os.strerror(err))).encode())
        sys.exit(1)
    os.close(fd)
chan = socket.socket(fileno=chan)
chan.sendall(b"+")
while chan.recv(1):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socket.send_fds(chan, [b"s"], [s.fileno()])
    s.close()
"""


def spawn(
    script: str, user: int, net: int, *args: str
) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """``python -I -S -c script CHAN USER NET *args`` with the namespace fds ``user`` and
    ``net`` (closed here) and one end of a socket pair (``CHAN``) passed to it; the other end
    and the process. Its stderr is a pipe, for the error it gives when it fails."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fds = (theirs.fileno(), user, net)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", script, *map(str, fds), *args],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        os.close(user)
        os.close(net)
    return ours, proc


class Helper:
    """One helper process in the namespaces ``user`` and ``net`` (fds; they are closed)."""

    def __init__(self, user: int, net: int) -> None:
        self._chan, self._proc = spawn(_SCRIPT, user, net)
        if self._chan.recv(1) != b"+":
            _, err = self._proc.communicate(timeout=30)
            self.close()
            raise errors.BackendError(
                f"{NAME}: cannot join the guest's namespaces for a forward: "
                f"{err.decode(errors='replace').strip() or 'the helper exited'}"
            )

    def socket(self) -> socket.socket:
        """A new TCP socket in the guest's network namespace."""
        self._chan.sendall(b"?")
        _, fds, _, _ = socket.recv_fds(self._chan, 1, 1)
        if not fds:
            raise errors.MachineGone(f"{NAME}: the forward's namespace helper exited")
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        self._chan.close()  # the helper reads EOF and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        if self._proc.returncode is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
