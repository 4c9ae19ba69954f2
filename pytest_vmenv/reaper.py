"""Sweeping what dead owners left, and the per-process watchdog that sweeps after a crash.

* :func:`sweep` destroys every machine whose owner process is dead (never one of a live
  owner: two sessions side by side survive each other's sweeps), removes non-reused
  templates of sessions that have no live owner left, the scratch dirs of dead owners, and
  clears their ledger entries. Kept machines (``--vm-keep``) are left alone unless
  ``include_kept``; so is a template a machine is still built on (``TemplateInUse``): its
  record stays, and the sweep that removes the last machine on it removes it too.
* :class:`Watchdog` is a small detached process started with the first machine. pytest holds
  the write end of a pipe to it; a clean end writes ``bye`` first. End-of-file without
  ``bye`` means pytest died (SIGKILL, OOM, a crashed xdist worker): the watchdog waits for
  the owner to be gone, sweeps what it owned, and exits.

``python -m pytest_vmenv.reaper watch FD OWNER STATE_DIR`` is the watchdog's entry point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .backend import Backend, Closer, Session, SessionEnder, Snapshot, TemplateLister
from .caches import remove_scratch, scratch_caches
from .errors import TemplateInUse
from .ledger import (
    OwnerRecord,
    file_lock,
    owners,
    remove_owner,
    remove_session_dir,
    session_templates,
    sessions,
)
from .owners import owner_alive
from .poll import poll_until
from .registry import Registry

__all__ = ["SweepReport", "Watchdog", "backends_from_ledger", "close_session", "sweep"]

log = logging.getLogger("pytest_vmenv")


@dataclass
class SweepReport:
    """What a sweep removed, what failed, and what it left because something still uses it."""

    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def _live_sessions(state_dir: Path) -> set[str]:
    return {r.session for r in owners(state_dir) if r.alive}


class _Sweep:
    """One sweep's rules: whose resources may go (see :func:`sweep`) and what it did."""

    def __init__(
        self, state_dir: Path, only_owner: str | None, include_kept: bool, older_than: float | None
    ) -> None:
        self.state_dir = state_dir
        self.only_owner = only_owner
        self.include_kept = include_kept
        self.older_than = older_than
        self.now = time.time()
        self.live = _live_sessions(state_dir)
        self.report = SweepReport()
        self.removed_handles: set[str] = set()
        self.held_handles: set[str] = set()

    def old_enough(self, created: float) -> bool:
        return self.older_than is None or self.now - created >= self.older_than

    def wanted(self, owner: str, created: float) -> bool:
        if self.only_owner is not None and owner != self.only_owner:
            return False
        return bool(owner) and not owner_alive(owner) and self.old_enough(created)

    def machines(self, backend: Backend) -> None:
        """Destroy the machines of dead owners on ``backend``."""
        try:
            refs = list(backend.owned(None))
        except Exception as exc:  # noqa: BLE001 - one broken backend must not stop the sweep
            self.report.errors.append(f"{backend.name}: cannot list machines: {exc}")
            return
        for ref in refs:
            if not self.wanted(ref.owner, ref.created) or (ref.kept and not self.include_kept):
                continue
            try:
                backend.destroy(ref)
                self.report.removed.append(f"{backend.name} machine {ref.name} ({ref.id})")
            except Exception as exc:  # noqa: BLE001
                self.report.errors.append(f"{backend.name} machine {ref.name} ({ref.id}): {exc}")

    def templates(self, backend: Backend) -> None:
        """Remove the non-reused templates of ``backend`` whose session has no live owner."""
        if not isinstance(backend, TemplateLister):
            return
        for snap in backend.templates():
            if snap.reuse or not snap.session or snap.session in self.live:
                continue
            if self.wanted(snap.owner, snap.created):
                outcome = _remove_template(backend, snap, self.report)
                held = outcome == "left"
                (self.held_handles if held else self.removed_handles).add(snap.handle)

    def owners(self, names: set[str]) -> None:
        """Clear the ledger entries of dead owners whose backends (all in ``names``) were swept."""
        for record in owners(self.state_dir):
            if record.alive or (self.only_owner is not None and record.owner != self.only_owner):
                continue
            if self.old_enough(record.created) and set(record.backends) <= names:
                remove_owner(record)


def sweep(
    backends: Iterable[Backend],
    state_dir: Path,
    *,
    only_owner: str | None = None,
    include_kept: bool = False,
    older_than: float | None = None,
) -> SweepReport:
    """Destroy what dead owners left on ``backends`` and clear their ledger entries.

    ``only_owner`` limits the sweep to one owner token (the watchdog's case). ``older_than``
    (seconds) spares anything younger. A template goes once no owner of its session lives
    and no machine is built on it any more.
    """
    backends = list(backends)
    run = _Sweep(state_dir, only_owner, include_kept, older_than)
    for backend in backends:
        run.machines(backend)
        run.templates(backend)
    run.owners({b.name for b in backends})
    for session in sessions(state_dir):
        if session in run.live or owners(state_dir, session):
            continue  # a process of it lives, or a dead one's records could not be cleared yet
        close_session(
            backends,
            state_dir,
            session,
            run.report,
            skip=run.removed_handles,
            held=run.held_handles,
        )
    if only_owner is None:
        _sweep_scratch(state_dir, run.report, older_than=older_than)
    return run.report


def _sweep_scratch(
    state_dir: Path,
    report: SweepReport,
    session: str | None = None,
    older_than: float | None = None,
) -> None:
    """Remove the scratch dirs (``<state>/scratch/<session>-<worker>``) of sessions with no
    live process (of ``session`` only, if given); what :func:`.caches.scratch_held` holds (a
    live session's dir, a Machine's transfer file) is never touched."""
    prefix = f"{session}-" if session is not None else ""
    for cache in scratch_caches(state_dir, _live_sessions(state_dir)):
        path = Path(cache.path)
        if cache.held or not path.name.startswith(prefix):
            continue
        if older_than is not None and time.time() - cache.created < older_than:
            continue
        try:
            remove_scratch(state_dir, cache)
        except OSError as exc:
            report.errors.append(f"scratch dir {path.name}: {exc}")
            continue
        report.removed.append(f"scratch dir {path.name}")


def close_session(
    backends: Iterable[Backend],
    state_dir: Path,
    session: str,
    report: SweepReport,
    skip: Container[str] = (),
    held: Container[str] = (),
) -> None:
    """End a session none of whose processes is left (its last one at exit, or a sweep).

    Removes the templates recorded for it that belong to ``backends`` (a record stays, for a
    later sweep, while its removal fails, a machine is still built on it, or its backend is
    not at hand; handles in ``skip`` are already gone, those in ``held`` were just found in
    use), its scratch dirs, its ledger dir, and lets each backend clean up (optional
    ``end_session``).
    """
    by_name = {b.name: b for b in backends}
    for path, data in session_templates(state_dir, session):
        backend = by_name.get(str(data.get("backend")))
        if backend is None or data.get("reuse") or data.get("handle") in held:
            continue
        if "handle" in data and data["handle"] not in skip:
            snap = Snapshot(
                backend=backend.name,
                name=str(data.get("name", "")),
                handle=str(data["handle"]),
                key=str(data.get("key", "")),
                data=data.get("data", {}),
                session=session,
                owner=str(data.get("owner") or ""),
                created=float(data.get("created") or 0),
            )
            if _remove_template(backend, snap, report) != "removed":
                continue
        path.unlink(missing_ok=True)
    _sweep_scratch(state_dir, report, session=session)
    remove_session_dir(state_dir, session)
    for backend in by_name.values():
        if isinstance(backend, SessionEnder):
            try:
                backend.end_session(session)
            except Exception as exc:  # noqa: BLE001
                report.errors.append(f"{backend.name}: end of session {session}: {exc}")


def _remove_template(
    backend: Backend, snap: Snapshot, report: SweepReport
) -> Literal["removed", "left", "failed"]:
    """Remove one template; one a machine is still built on is ``left`` (not an error)."""
    what = f"{backend.name} template {snap.key or snap.handle}"
    try:
        backend.remove_template(snap)
    except TemplateInUse as exc:
        report.left.append(f"{what}: in use: {exc.holder}")
        return "left"
    except Exception as exc:  # noqa: BLE001
        report.errors.append(f"{what}: {exc}")
        return "failed"
    report.removed.append(what)
    return "removed"


def backends_from_ledger(
    state_dir: Path, registry: Registry, records: list[OwnerRecord] | None = None
) -> list[Backend]:
    """One backend object per backend the ledger mentions, made with its recorded options."""
    made: dict[str, Backend] = {}
    for record in owners(state_dir) if records is None else records:
        for name, options in record.backends.items():
            if name in made:
                continue
            try:
                backend: Backend = registry.load(name)(options)
                backend.check()
            except Exception as exc:  # noqa: BLE001 - report and sweep the others
                log.warning("pytest-vmenv: cannot sweep backend %s: %s", name, exc)
                continue
            made[name] = backend
    return list(made.values())


def close_backends(backends: Iterable[Backend]) -> None:
    """Let each backend release what this process holds (optional ``close``); never raises."""
    for backend in backends:
        if isinstance(backend, Closer):
            with contextlib.suppress(Exception):
                backend.close()


class Watchdog:
    """The detached sweeper of one pytest process (see the module docstring)."""

    def __init__(self, session: Session) -> None:
        read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        log_path = session.state_dir / "watchdog.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "pytest_vmenv.reaper", "watch",
                    str(read_fd), session.owner, str(session.state_dir),
                ],
                pass_fds=(read_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # Ctrl-C in the terminal must not reach it
                cwd="/",
            )  # fmt: skip
        os.close(read_fd)

    def goodbye(self) -> None:
        """A clean end: tell the watchdog there is nothing to sweep, and let it go."""
        if self._write_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"bye")
        os.close(self._write_fd)
        self._write_fd = -1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


def _watch(fd: int, owner: str, state_dir: Path) -> int:
    received = b""
    while True:
        try:
            chunk = os.read(fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            break
        received += chunk
    if received.startswith(b"bye"):
        return 0
    # the pipe closes a moment before the process is fully gone
    poll_until(
        lambda last_try: True if last_try or not owner_alive(owner) else None,
        timeout=10,
        what=f"the end of {owner}",
        interval=0.05,
        max_interval=0.05,
    )
    records = [r for r in owners(state_dir) if r.owner == owner]
    backends = backends_from_ledger(state_dir, Registry(), records)
    try:
        with file_lock(state_dir, "sweep"):
            report = sweep(backends, state_dir, only_owner=owner)
    finally:
        close_backends(backends)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for line in report.removed:
        print(f"{stamp} watchdog {owner}: removed {line}", flush=True)
    for line in report.errors:
        print(f"{stamp} watchdog {owner}: ERROR {line}", flush=True)
    return 1 if report.errors else 0


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "watch":
        print("usage: python -m pytest_vmenv.reaper watch FD OWNER STATE_DIR", file=sys.stderr)
        return 2
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return _watch(int(argv[1]), argv[2], Path(argv[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
