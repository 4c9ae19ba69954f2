"""The guest's keeper: the zygote's child that makes the guest and waits for its PID 1.

It runs in the host's PID namespace: it arms ``PR_SET_PDEATHSIG`` on the zygote, joins the
guest's leaf cgroups (made by the host while the zygote forked it, announced by a ``go``
message on the control socket), probes the OOM score (:mod:`.oom`), enters a user namespace
when unprivileged (:mod:`.userns`), unshares the guest's namespaces, forks PID 1
(:mod:`.pid1`) and then relays the guest's console into its log (:mod:`.console`) until
PID 1 exits. Any failure is reported on the control socket; a keeper never returns to the
zygote's loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import traceback
from collections.abc import Mapping
from typing import Any

from .. import syscalls, wire
from . import console, oom, pid1, userns

__all__ = ["GUEST_NAMESPACES", "run"]

GUEST_NAMESPACES = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWNET
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWCGROUP
)
_PR_SET_PDEATHSIG = 1


def _orphan_guard(zygote: int) -> None:
    """Die with the zygote; exit at once if it is already gone."""
    syscalls.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote:
        os._exit(1)


def _join(cgroups: list[str], ctl_fd: int, wait_go: bool) -> None:
    """Join the guest's leaf cgroups: ``cgroups``, or those the host's ``go`` names."""
    if wait_go:
        go = json.loads(os.read(ctl_fd, 65536) or b"{}")
        if go.get("op") != "go":
            os._exit(1)
        cgroups = [str(p) for p in go.get("cgroups", [])]
    for procs in cgroups:
        with open(procs, "w", encoding="ascii") as f:
            f.write("0")


def _wait(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _make_guest(cfg: Mapping[str, Any], cgroups: list[str], ctl_fd: int, zygote: int) -> None:
    _orphan_guard(zygote)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    syscalls.close_fds_except([ctl_fd])
    _join(cgroups, ctl_fd, bool(cfg.get("go")))
    cfg = {**cfg, "oom": oom.probe()}  # before any user namespace (see .oom)
    ids = cfg.get("userns")
    if ids is not None:  # unprivileged: a user namespace owns the others (see .userns)
        userns.enter(int(ids[0]), int(ids[1]), cfg.get("nproc"), cfg.get("subids"))
        _orphan_guard(zygote)  # kept, but a new cred: re-arm
    relay = console.Relay(cfg["gdir"]) if cfg.get("console_relay") else None
    syscalls.unshare(GUEST_NAMESPACES)
    init = os.fork()
    if init == 0:
        syscalls.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if relay is not None:
            relay.close()
        pid1.pid1_main(cfg, ctl_fd)
        os._exit(0)
    os.close(ctl_fd)
    if relay is not None:  # the console's reader, until PID 1 exits (see .console)
        relay.serve(init)
    else:
        _wait(init)


def run(cfg: Mapping[str, Any], cgroups: list[str], ctl_fd: int, zygote: int) -> None:
    """Runs in the forked child: join cgroups, unshare, fork PID 1, wait for it; never returns."""
    try:
        _make_guest(cfg, cgroups, ctl_fd, zygote)
    except BaseException:  # noqa: BLE001 - a forked child must never return to the loop
        with contextlib.suppress(OSError):
            wire.send(socket.socket(fileno=ctl_fd), {"error": traceback.format_exc()[-4000:]})
        os._exit(1)
    os._exit(0)
