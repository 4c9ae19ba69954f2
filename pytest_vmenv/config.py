"""Load ``vmenv.toml`` or ``[tool.vmenv]`` from pyproject.toml and render its strings.

Every string value is a Jinja2 template rendered once, at load time, with ``env`` (the process
environment), ``vars`` (``[vars]`` in the file, overridden by ``--vm-var KEY=VALUE``),
``worker_id`` and ``session_id``. Undefined names are errors (``StrictUndefined``), reported
with the dotted key and the file, so a typo never turns silently into an empty host name.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["VmenvConfig", "find_config", "load_config"]

_TOP_KEYS = ("backend", "vars", "images", "machines", "environments", "backends")


@dataclass(frozen=True)
class VmenvConfig:
    """The rendered configuration. ``path`` is where it came from (None: no file)."""

    path: Path | None = None
    backend: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    images: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    machines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    environments: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    backends: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "(no vmenv.toml)"

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


def find_config(rootdir: Path, explicit: str | None = None) -> tuple[Path, str] | None:
    """Return (file, table) to read: ``explicit``, else vmenv.toml, else pyproject [tool.vmenv]."""
    if explicit:
        path = Path(explicit)
        if not path.is_absolute():
            path = rootdir / path
        if not path.is_file():
            raise ConfigError(f"--vm-config {explicit!r}: no such file ({path})")
        return path, ("tool.vmenv" if path.name == "pyproject.toml" else "")
    if (rootdir / "vmenv.toml").is_file():
        return rootdir / "vmenv.toml", ""
    pyproject = rootdir / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return None
        if "vmenv" in data.get("tool", {}):
            return pyproject, "tool.vmenv"
    return None


def load_config(
    rootdir: Path,
    explicit: str | None = None,
    *,
    cli_vars: Mapping[str, str] | None = None,
    worker_id: str = "master",
    session_id: str = "",
) -> VmenvConfig:
    """Find, parse, validate and render the configuration (empty if there is none)."""
    found = find_config(rootdir, explicit)
    if found is None:
        return VmenvConfig(vars=dict(cli_vars or {}))
    path, table = found
    try:
        data: Any = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    prefix = ""
    for part in table.split(".") if table else ():
        data = data.get(part, {})
        prefix += part + "."
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key '{prefix}{unknown[0]}'. Choose one of: {', '.join(_TOP_KEYS)}"
        )
    for key in _TOP_KEYS[1:]:
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"{path}: {prefix}{key} must be a table")
    file_vars = {str(k): str(v) for k, v in data.get("vars", {}).items()}
    variables = {**file_vars, **(cli_vars or {})}
    context = {
        "env": dict(os.environ),
        "vars": variables,
        "worker_id": worker_id,
        "session_id": session_id,
    }
    import jinja2  # imported here: a session with no vmenv.toml never pays for it

    jenv = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    rendered = _render(jenv, data, context, path, prefix.rstrip("."))
    backend = rendered.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise ConfigError(f"{path}: {prefix}backend must be a string, got {backend!r}")
    images = rendered.get("images", {})
    for name, entry in images.items():
        _check_image(entry, f"{path}: {prefix}images.{name}")
    return VmenvConfig(
        path=path,
        backend=backend,
        vars=variables,
        images=images,
        machines=rendered.get("machines", {}),
        environments=rendered.get("environments", {}),
        backends=rendered.get("backends", {}),
    )


def _check_image(entry: Any, where: str) -> None:
    """An image entry maps backend names to tables, and may be a recipe (``base``, with
    ``packages``) that every backend able to build it builds from the archive."""
    from .images import BASES, check_packages

    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    for key, value in entry.items():
        if key == "base":
            if value not in BASES:
                raise ConfigError(
                    f"{where}.base = {value!r} is not an image built from an archive. "
                    f"Choose one of: {', '.join(BASES)}"
                )
        elif key == "packages":
            if "base" not in entry:
                raise ConfigError(
                    f'{where}.packages needs a base to install them on: add base = "debian-12"'
                )
            check_packages(value, f"{where}.packages")
        elif not isinstance(value, dict):
            raise ConfigError(
                f"{where}.{key} must be a table: images map backend names to tables, e.g. "
                'emulator = { rootfs = "images/rootfs.tar" }, or are a recipe: '
                'base = "debian-12", packages = ["nginx"]'
            )


def _render(jenv: Any, value: Any, context: Mapping[str, Any], path: Path, key: str) -> Any:
    if isinstance(value, str):
        if "{" not in value:
            return value
        import jinja2

        try:
            return jenv.from_string(value).render(context)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"{path}: key {key!r}: cannot render {value!r}: {exc}") from None
    if isinstance(value, dict):
        return {
            k: _render(jenv, v, context, path, f"{key}.{k}" if key else k) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_render(jenv, v, context, path, f"{key}[{i}]") for i, v in enumerate(value)]
    return value
