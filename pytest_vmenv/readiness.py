"""``ready=``: when a new machine counts as up, and what a test sees when it never does."""

from __future__ import annotations

import time

from .diagnose import missing_command, not_found
from .errors import BootTimeout, CommandFailed, CommandTimeout
from .machine import Machine

__all__ = ["console_tail", "wait_ready"]


def console_tail(machine: Machine, lines: int = 30) -> str:
    """The last ``lines`` of the machine's console ("" if it has none to read).

    Never raises: it runs while a failure is being reported, when the machine may be gone.
    """
    try:
        return "\n".join(machine.console_log().splitlines()[-lines:])
    except Exception:  # noqa: BLE001 - a dead machine has no console to read
        return ""


def wait_ready(machine: Machine, deadline: float) -> None:
    """Wait for ``ready=``; BootTimeout with the console tail if it does not hold by
    ``deadline`` (a ``time.monotonic()``).

    A probe whose command the guest does not have (exit 127, "not found") fails at once:
    waiting cannot make it appear.
    """
    ready = machine.spec.ready or ""
    left = max(deadline - time.monotonic(), 0.5)
    try:
        if ready.startswith("port:"):
            machine.wait_for_port(int(ready[5:]), timeout=left)
            return
        first = machine.run(ready, timeout=left)
        if first.exit_code == 0:
            return
        missing = missing_command(first.exit_code, first.stderr)
        if missing is None:
            machine.wait_until_succeeds(ready, timeout=max(deadline - time.monotonic(), 0.5))
            return
    except (CommandFailed, CommandTimeout) as exc:
        failed = exc if isinstance(exc, CommandFailed) else None
        missing = missing_command(failed.exit_code, failed.stderr) if failed else None
        why = f" within {machine.spec.timeout:g}s: {str(exc).splitlines()[0]}"
    if missing is not None:
        why = (
            f": {not_found(missing)}; install it in the image (or in a provision step), or "
            "change ready="
        )
    tail = console_tail(machine)
    raise BootTimeout(f"machine {machine.name!r} was not ready (ready={ready!r}){why}", tail)
