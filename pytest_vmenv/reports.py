"""Per-test hooks, registered once the first machine is made (unused, they cost nothing):
release a test's machines after it, and add their commands and console to a failure report."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from .keys import machines_key
from .machine import Machine
from .orchestrator import Orchestrator
from .readiness import console_tail

__all__ = ["MachineHooks"]


def _commands(machine: Machine) -> str:
    """The machine's last 50 commands, one line each: exit status and duration."""
    return "\n".join(
        f"$ {r.command}  -> "
        + ("timed out" if r.exit_code is None else f"exit {r.exit_code}")
        + f" ({r.duration * 1000:.1f} ms)"
        for r in machine.history[-50:]
    )


class MachineHooks:
    """The hooks of one orchestrator's machines."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        self.orchestrator.release(f"function:{item.nodeid}")
        module = item.getparent(pytest.Module)
        next_module = nextitem.getparent(pytest.Module) if nextitem else None
        if module is not None and (next_module is None or next_module.nodeid != module.nodeid):
            self.orchestrator.release(f"module:{module.nodeid}")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        machines = item.stash.get(machines_key, None)
        if report.failed and machines:
            self.orchestrator.taint(machines.values())
            for machine in machines.values():
                self._sections(report, item, machine)
        return report

    def _sections(self, report: pytest.TestReport, item: pytest.Item, machine: Machine) -> None:
        """The commands and the console tail (when there is one) of ``machine``."""
        text = _commands(machine)
        if text:
            report.sections.append((f"vmenv {machine.name}: commands", text))
            item.user_properties.append((f"vmenv {machine.name} commands", text))
        tail = console_tail(machine)
        if tail:
            report.sections.append((f"vmenv {machine.name}: console (tail)", tail))
            item.user_properties.append((f"vmenv {machine.name} console", tail))
