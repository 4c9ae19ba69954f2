"""The guest side of the unprivileged mode (see :mod:`..host.userns`): what its keeper and
PID 1 do when pytest does not run as root.

The keeper enters the user namespace (:func:`enter`); PID 1 freezes the guest with SIGSTOP
where no cgroup freezer is delegated (:func:`stop_all`) and leaves the supplementary groups
alone when ``setgroups`` is denied (:func:`setgroups_denied`).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import syscalls

__all__ = ["enter", "setgroups_denied", "stop_all"]


def enter(
    uid: int, gid: int, nproc: int | None = None, subids: Mapping[str, Any] | None = None
) -> None:
    """In the keeper: a new user namespace where ``uid``/``gid`` are root.

    Without ``subids``, that is all it maps (single-line maps, ``setgroups`` denied). With
    them (the host's :meth:`pytest_vmenv.images.subids.SubIds` as the host passes them:
    ``newuidmap``/``newgidmap`` paths and the ``uid``/``gid`` arguments), ``newuidmap`` maps
    0 to the user and 1..count to the subordinate range (see :func:`_mapped`).

    ``nproc`` is then this process's ``RLIMIT_NPROC`` (soft and hard), inherited by PID 1 and
    every command: the kernel counts it per user *and* user namespace, so it bounds the
    guest's processes and threads, not the user's others on the host (see the module
    docstring). With a full map a guest has many users, each counted on its own; so the
    guest gets a second, nested user namespace (identity-mapped over the first) made with
    that limit in place: the kernel also charges every process of a namespace to its
    creator in the parent namespace, up to the creator's limit, so the first namespace's
    root (this guest's alone) bounds the guest's processes of every user together.
    """
    if subids is None:
        syscalls.unshare(syscalls.CLONE_NEWUSER)
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"0 {uid} 1\n"),
            ("gid_map", f"0 {gid} 1\n"),
        ):
            with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
                f.write(text)
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        return
    codecs.lookup("ascii")  # PID 1 needs it after pivot_root; only the helpers used it here
    uid_args, gid_args = list(subids["uid"]), list(subids["gid"])
    _mapped(lambda pid: _newidmaps(pid, subids))
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    _mapped(lambda pid: _identity_maps(pid, uid_args, gid_args))


def _newidmaps(pid: int, subids: Mapping[str, Any]) -> None:
    _run([subids["newuidmap"], str(pid), *subids["uid"]])
    _run([subids["newgidmap"], str(pid), *subids["gid"]])


def _identity_maps(pid: int, uid_args: list[str], gid_args: list[str]) -> None:
    _write_map(pid, "uid_map", uid_args)
    _write_map(pid, "gid_map", gid_args)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise OSError(f"{' '.join(argv)} failed (exit {proc.returncode}): {err}")


def _write_map(pid: int, name: str, args: list[str]) -> None:
    """The identity over the outer namespace, extent by extent (a range of a map must lie
    within one extent of its parent's)."""
    lines = [f"{args[i]} {args[i]} {args[i + 2]}\n" for i in range(0, len(args), 3)]
    with open(f"/proc/{pid}/{name}", "w", encoding="ascii") as f:
        f.write("".join(lines))


def _mapped(write_maps: Callable[[int], object]) -> None:
    """Unshare a user namespace whose maps a child (left in the current one) writes.

    A process cannot map ids it does not have into its own new namespace: ``newuidmap``
    (setuid root) must write them from outside, on the pid of a process already in it. The
    child waits until this process has unshared, writes the maps with ``write_maps(pid)``,
    and reports an error on a pipe; this process waits for it.
    """
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(go_w)
        os.close(err_r)
        code = 1
        try:
            if os.read(go_r, 1) == b"+":
                write_maps(os.getppid())
                code = 0
        except BaseException as exc:  # noqa: BLE001 - a forked child must never return
            os.write(err_w, str(exc).encode()[:4000])
        os._exit(code)
    os.close(go_r)
    os.close(err_w)
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER)
        os.write(go_w, b"+")
    finally:
        os.close(go_w)
        err = os.read(err_r, 4096)
        os.close(err_r)
        _, status = os.waitpid(child, 0)
    if status != 0:
        raise OSError(err.decode("utf-8", "replace") or "the id-mapping helper failed")


def setgroups_denied() -> bool:
    """Whether this process is in a user namespace with ``setgroups`` denied."""
    try:
        with open("/proc/self/setgroups", encoding="ascii") as f:
            return f.read().strip() == "deny"
    except OSError:
        return False


def stop_all(stop: bool, timeout: float = 5.0) -> None:
    """In PID 1: SIGSTOP (or SIGCONT) every other process of the guest; wait until stopped."""
    if not stop:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGCONT)
        return
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGSTOP)  # every process of the PID namespace but PID 1
        running = [pid for pid in _pids() if _state(pid) not in ("T", "t", "Z", "X", "")]
        if not running:
            return
        if time.monotonic() > deadline:
            os.kill(-1, signal.SIGCONT)
            raise TimeoutError(f"processes {running[:5]} did not stop within {timeout:g}s")
        time.sleep(0.002)


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and n != "1"]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""
