"""The zygote: a single-threaded helper that forks guests on request.

Why it exists: forking a guest straight from pytest is unsafe (pytest may have threads, and
``PR_SET_PDEATHSIG`` fires when the parent *thread* exits), and starting a fresh Python per
guest costs 40-60 ms. The zygote has imported everything a guest needs, so a fork is ready
to work at once.

Protocol (SEQPACKET, :mod:`.wire`): ``{"op": "spawn", "cfg": {...}, "cgroups": [paths]}``
with the guest end of its control socket attached; the answer is ``{"ok": true, "pid": N}``
(N is the guest's keeper process) or ``{"error": "..."}``. With ``cfg["go"]`` the keeper
first waits for ``{"op": "go", "cgroups": [paths]}`` on that control socket: the host makes
the guest's cgroups while the zygote forks (a fork of it costs about as much), and the
keeper joins what was made. The guest itself reports
``ready`` (with PID 1's host pid) on its control socket. ``{"op": "keep", "pid": N}`` marks
keeper N as kept (``--vm-keep``); the answer is ``{"ok": true}``.

Process chain: zygote -> keeper (:mod:`.guest.keeper`; host PID namespace, joins the guest's
leaf cgroups, see :mod:`.host.cgroups`, then unshares the namespaces, the cgroup namespace among
them: its root is that leaf; unprivileged, a user namespace first, see :mod:`.guest.userns`) ->
PID 1 of the new PID namespace. Each link has ``PR_SET_PDEATHSIG=SIGKILL`` on its parent, and
the zygote kills every keeper that is not kept when its own socket reaches end-of-file (pytest
exited or died), so no guest outlives the process that made it unless it was kept. With kept
keepers left, the zygote stays (only reaping) until the last of them is gone (destroyed from any
process: the keeper is in the guest's cgroups), then exits. It runs in its own session, so
neither a terminal's signals nor a kill of pytest's process group take kept guests down; it
still sees pytest's death as end-of-file.

While PID 1 runs, its keeper is also the reader of the guest's console FIFO and writes what
arrives into the size-capped ``console.log`` (see :mod:`.guest.console`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time

from . import syscalls, wire
from .guest import keeper

__all__ = ["main", "serve"]

_PR_SET_CHILD_SUBREAPER = 36


def _reap(children: set[int], kept: set[int]) -> bool:
    """Reap every exited child (keepers, and guest PID 1s orphaned to us); False if none left.

    The zygote is a child subreaper: when a keeper dies before its PID 1 (``cgroup.kill``
    kills both at once), the PID 1 is reparented here instead of to the host's init, which
    in a container may never reap it.
    """
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            kept.clear()
            return False
        if pid == 0:
            break
        children.discard(pid)
    kept &= children
    return True


def _orphaned(children: set[int], kept: set[int], rfd: int) -> None:
    """Our creator is gone: kill the keepers that are not kept, reap the rest, then exit."""
    for pid in children - kept:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # for the PID 1s of killed keepers to be reparented
    while True:
        if not _reap(children, kept) or (not kept and time.monotonic() > deadline):
            os._exit(0)
        select.select([rfd], [], [], 0.1)
        with contextlib.suppress(BlockingIOError):
            os.read(rfd, 512)


def serve(sock: socket.socket) -> None:
    """Serve requests until ``sock`` reaches end-of-file, then see :func:`_orphaned`."""
    me = os.getpid()
    children: set[int] = set()
    kept: set[int] = set()
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    poll.register(rfd, select.POLLIN)
    while True:
        for fd, _ev in poll.poll():
            if fd == rfd:
                with contextlib.suppress(BlockingIOError):
                    os.read(rfd, 512)
                _reap(children, kept)
                continue
            try:
                msg, fds = wire.recv(sock)
            except OSError:
                msg, fds = None, []
            if msg is None:
                sock.close()
                _orphaned(children, kept, rfd)
                return
            if msg.get("op") == "keep" and not fds:
                pid = int(msg.get("pid", 0))
                if pid in children:
                    kept.add(pid)
                    wire.send(sock, {"ok": True})
                else:
                    wire.send(sock, {"error": f"no keeper {pid} (its guest is gone)"})
                continue
            if msg.get("op") != "spawn" or len(fds) != 1:
                for x in fds:
                    os.close(x)
                wire.send(sock, {"error": f"bad request {msg.get('op')!r}"})
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(fds[0])
                wire.send(sock, {"error": f"fork failed: {exc}"})
                continue
            if pid == 0:
                keeper.run(msg["cfg"], list(msg.get("cgroups", [])), fds[0], me)
            os.close(fds[0])
            children.add(pid)
            wire.send(sock, {"ok": True, "pid": pid})


def main() -> None:
    """Entry point: ``python -m pytest_vmenv.emulator.zygote FD``."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in pytest must not kill guests early
    syscalls.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    serve(sock)


if __name__ == "__main__":
    main()
