"""The ``--vm-*`` options and how each resolves: command line, then ``VMENV_*``, then ini."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

from .errors import ConfigError

__all__ = ["Options", "add_options"]

KEEP = ("never", "failed", "always")
UNAVAILABLE = ("skip", "fail")


_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--vm-backend",
        {
            "metavar": "NAME",
            "help": "backend for machines that name none "
            "[env VMENV_BACKEND, ini vmenv_backend; default: vmenv.toml's, else emulator]",
        },
    ),
    (
        "--vm-config",
        {
            "metavar": "PATH",
            "help": "configuration file [env VMENV_CONFIG, "
            "ini vmenv_config; default: vmenv.toml, else pyproject.toml [tool.vmenv]]",
        },
    ),
    (
        "--vm-debug",
        {
            "action": "store_const",
            "const": "1",
            "help": "show the plugin's own traceback frames in failure reports (also -vv) "
            "[env VMENV_DEBUG, ini vmenv_debug]",
        },
    ),
    (
        "--vm-keep",
        {
            "choices": KEEP,
            "help": "keep machines after their tests: never, "
            "failed (of failed tests) or always [env VMENV_KEEP, ini vmenv_keep; "
            "default never]",
        },
    ),
    (
        "--vm-parallel",
        {
            "metavar": "N",
            "type": int,
            "help": "templates built at once "
            "[env VMENV_PARALLEL, ini vmenv_parallel; default: number of CPUs]",
        },
    ),
    (
        "--vm-reuse",
        {
            "action": "store_const",
            "const": "1",
            "help": "keep templates across sessions and reuse them "
            "[env VMENV_REUSE, ini vmenv_reuse]",
        },
    ),
    (
        "--vm-unavailable",
        {
            "choices": UNAVAILABLE,
            "help": "what to do with tests whose "
            "machines cannot be made here (the backend cannot run, or cannot make that "
            "machine) [env VMENV_UNAVAILABLE, ini vmenv_unavailable; default fail]",
        },
    ),
    (
        "--vm-var",
        {
            "metavar": "KEY=VALUE",
            "action": "append",
            "help": "a variable for "
            "vmenv.toml templates ({{ vars.KEY }}); repeatable [env VMENV_VAR "
            "'K=V K2=V2', ini vmenv_var]",
        },
    ),
)
"""Every ``--vm-*`` flag with its ``addoption`` keywords."""

_INI = (
    ("backend", "default backend"),
    ("config", "configuration file"),
    ("debug", "show the plugin's traceback frames in reports (true/false)"),
    ("keep", "never, failed or always"),
    ("parallel", "templates built at once"),
    ("reuse", "reuse templates across sessions (true/false)"),
    ("unavailable", "skip or fail"),
)
"""The ``vmenv_*`` ini keys of the flags (``vmenv_var`` is a line list, added apart)."""


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmenv", "declarative test machines (pytest-vmenv)")
    for flag, keywords in _FLAGS:
        group.addoption(flag, **keywords)
    for name, help_ in _INI:
        parser.addini(f"vmenv_{name}", help_, default=None)
    parser.addini("vmenv_var", "KEY=VALUE lines for vmenv.toml templates", type="linelist")


def _raw(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(f"vm_{name}")
    if value is not None:
        return str(value)
    env = os.environ.get(f"VMENV_{name.upper()}")
    if env:
        return env
    ini = config.getini(f"vmenv_{name}")
    return str(ini) if ini else None


def _choice(config: pytest.Config, name: str, choices: tuple[str, ...], default: str) -> str:
    value = _raw(config, name) or default
    if value not in choices:
        raise ConfigError(f"--vm-{name}={value!r}. Choose one of: {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Options:
    backend: str | None
    config: str | None
    debug: bool
    keep: str
    parallel: int
    reuse: bool
    unavailable: str
    vars: dict[str, str]

    @classmethod
    def from_config(cls, config: pytest.Config) -> Options:
        parallel_raw = _raw(config, "parallel")
        try:
            parallel = int(parallel_raw) if parallel_raw else (os.cpu_count() or 1)
        except ValueError:
            raise ConfigError(f"--vm-parallel={parallel_raw!r} must be a whole number") from None
        if parallel < 1:
            raise ConfigError(f"--vm-parallel={parallel} must be at least 1")
        reuse_raw = (_raw(config, "reuse") or "").lower()
        debug_raw = (_raw(config, "debug") or "").lower()
        items: list[str] = list(config.getini("vmenv_var") or [])
        items += os.environ.get("VMENV_VAR", "").split()
        items += config.getoption("vm_var") or []
        variables = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--vm-var {item!r} must be KEY=VALUE")
            variables[key] = value
        return cls(
            backend=_raw(config, "backend"),
            config=_raw(config, "config"),
            debug=debug_raw in ("1", "true", "yes", "on"),
            keep=_choice(config, "keep", KEEP, "never"),
            parallel=parallel,
            reuse=reuse_raw in ("1", "true", "yes", "on"),
            unavailable=_choice(config, "unavailable", UNAVAILABLE, "fail"),
            vars=variables,
        )
