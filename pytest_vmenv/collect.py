"""Which machines a test, a module or the session gets: its ``vm``/``vmenv`` marks, parsed.

Misuse is a :class:`~pytest_vmenv.errors.ConfigError` naming the test (collected into one
usage error) or, for the scoped fixtures, a ``pytest.fail`` naming the fixture.
"""

from __future__ import annotations

import pytest

from .errors import ConfigError
from .keys import specs_key
from .spec import MachineSpec, SpecParser

__all__ = ["needs_machines", "scope_specs", "specs_for"]


def needs_machines(item: pytest.Item) -> bool:
    """Whether ``item`` asks for machines (a fixture ``vm``/``vms`` or a mark)."""
    uses = getattr(item, "fixturenames", ())
    return (
        "vm" in uses
        or "vms" in uses
        or item.get_closest_marker("vm") is not None
        or item.get_closest_marker("vmenv") is not None
    )


def _closest_vm_marks(item: pytest.Item) -> list[pytest.Mark]:
    """The ``vm`` marks of the closest level that has any (the test, else its class...)."""
    closest: list[pytest.Mark] = []
    owner = None
    for node, mark in item.iter_markers_with_node("vm"):
        if owner is None:
            owner = node
        if node is not owner:
            break
        closest.append(mark)
    return closest


def _vm_mark(parser: SpecParser, mark: pytest.Mark, where: str) -> MachineSpec:
    if len(mark.args) > 1:
        raise ConfigError(
            f"{where}: @pytest.mark.vm takes at most one positional argument (the "
            f"image), got {mark.args!r}"
        )
    fields = dict(mark.kwargs)
    if mark.args:
        if "image" in fields:
            raise ConfigError(f"{where}: @pytest.mark.vm got image twice")
        fields["image"] = mark.args[0]
    return parser.machine(fields, f"{where}: @pytest.mark.vm")


def _vmenv_mark(parser: SpecParser, item: pytest.Item, where: str) -> list[MachineSpec]:
    env_mark = item.get_closest_marker("vmenv")
    if env_mark is None:
        return []
    if len(env_mark.args) != 1 or env_mark.kwargs or not isinstance(env_mark.args[0], str):
        raise ConfigError(
            f'{where}: use @pytest.mark.vmenv("NAME") with the name of an environment'
        )
    return parser.environment(env_mark.args[0], f"{where}: @pytest.mark.vmenv")


def specs_for(parser: SpecParser, item: pytest.Item) -> list[MachineSpec]:
    """Machines of ``item``: the closest level with ``vm`` marks, plus a ``vmenv`` mark."""
    where = item.nodeid
    specs = [_vm_mark(parser, mark, where) for mark in reversed(_closest_vm_marks(item))]
    specs += _vmenv_mark(parser, item, where)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"{where}: two machines are named {spec.name!r}; give each vm mark a "
                "distinct name=..."
            )
        seen.add(spec.name)
    wants_vm = "vm" in getattr(item, "fixturenames", ())
    if not specs and wants_vm:
        specs = [parser.machine({}, f"{where}: fixture vm")]
    if wants_vm and len(specs) != 1:
        raise ConfigError(
            f"{where}: the fixture 'vm' needs exactly one machine, but the test has "
            f"{len(specs)} ({', '.join(sorted(seen))}); use the 'vms' fixture: vms['NAME']"
        )
    return specs


def scope_specs(request: pytest.FixtureRequest, scope: str, where: str) -> list[MachineSpec]:
    """The specs of ``scope`` ("module"/"session") that the selected tests where ``request``
    is (its module, or the whole session) declare, one per name.

    Two different machines of one name, or none at all, fail the fixture with what to do.
    """
    items = request.session.items
    if scope == "module":
        items = [i for i in items if i.getparent(pytest.Module) is request.node]
    specs: dict[str, MachineSpec] = {}
    others: set[str] = set()
    for item in items:
        for spec in item.stash.get(specs_key, []):
            if spec.scope != scope:
                others.add(f"{spec.name} (scope={spec.scope!r}, {item.nodeid})")
                continue
            seen = specs.setdefault(spec.name, spec)
            if seen != spec:
                pytest.fail(
                    f"{request.fixturename}: {where} has two different machines named "
                    f"{spec.name!r} with scope={scope!r}; give them distinct names",
                    pytrace=False,
                )
    if not specs:
        found = "; its tests' machines: " + ", ".join(sorted(others)[:5]) if others else ""
        pytest.fail(
            f"{request.fixturename}: {where} has no machine with scope={scope!r}{found}. "
            f'Declare one with @pytest.mark.vm(..., scope="{scope}"), or use the fixtures '
            "vm / vms in a function-scoped fixture",
            pytrace=False,
        )
    return list(specs.values())
