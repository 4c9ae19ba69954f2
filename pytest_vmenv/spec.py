"""MachineSpec: what one machine must be, parsed and validated from a marker or config."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import VmenvConfig
from .errors import ConfigError
from .images import BASES, INITS, check_packages
from .shipped import not_installed

__all__ = ["ISOLATIONS", "SCOPES", "MachineSpec", "SpecParser", "parse_size"]


@dataclass(frozen=True)
class MachineSpec:
    """A validated machine declaration.

    ``image`` is the name as the user wrote it; ``image_config`` is that image's entry for
    ``backend`` from ``[tool.vmenv.images.NAME]`` (paths made absolute), or empty when the
    backend interprets ``image`` itself (the emulator's ``"host"``, a rootfs path).
    ``memory``/``disk`` are bytes. ``provision`` items are shell strings or argv tuples.
    ``packages`` are Debian packages baked into a built image (``image_config`` then holds
    the recipe's ``base``); ``init`` is ``"systemd"``, ``"none"`` or None (the backend's
    default for the image: systemd for a built Debian image). ``outbound``: the machine may open
    connections out through the host (NAT, with DNS), for provisioning and while it runs;
    without it, nothing outside the machine (and its ``network``) is reachable.
    """

    name: str = "vm"
    image: str = "host"
    backend: str = "emulator"
    cpus: int = 1
    memory: int = 512 * 1024**2
    disk: int | None = None
    network: str | None = None
    packages: tuple[str, ...] = ()
    init: str | None = None
    outbound: bool = False
    provision: tuple[str | tuple[str, ...], ...] = ()
    ready: str | None = None
    timeout: float = 300.0
    scope: str = "function"
    isolation: str = "clone"
    labels: Mapping[str, str] = field(default_factory=dict)
    image_config: Mapping[str, Any] = field(default_factory=dict)


_FIELDS = (
    "name", "image", "backend", "cpus", "memory", "disk", "network", "packages", "init",
    "outbound", "provision", "ready", "timeout", "scope", "isolation", "labels",
)  # fmt: skip
SCOPES = ("function", "module", "session")
ISOLATIONS = ("clone", "revert")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def parse_size(value: object, where: str, field_name: str) -> int:
    """``512M``, ``2G``, ``1.5GiB`` or an int of bytes -> bytes (binary units)."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{where}: {field_name}={value!r} is not a size. "
            f'Use bytes or a number with K, M, G or T, e.g. "512M" or "2G"'
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


class SpecParser:
    """Turns marker kwargs and config tables into validated :class:`MachineSpec` objects.

    ``backends`` maps each installed backend name to the images it provides itself
    (``{"emulator": ("host",)}``); an image is valid if the config names it, the backend
    provides it, or it is an existing path (a rootfs directory or tarball).
    """

    def __init__(
        self, config: VmenvConfig, default_backend: str, backends: Mapping[str, Sequence[str]]
    ) -> None:
        self.config = config
        self.default_backend = default_backend
        self.backends = backends

    def machine(self, fields: Mapping[str, Any], where: str) -> MachineSpec:
        """Validate one machine's fields; ``where`` names the test or config key for errors."""
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown field {unknown[0]!r}. Choose one of: {', '.join(_FIELDS)}"
            )
        get = fields.get
        name = _name(get("name", "vm"), where)
        backend = get("backend") or self.default_backend
        if backend not in self.backends:
            raise ConfigError(
                f"{where}: backend={backend!r} {not_installed(backend, self.backends)}"
            )
        image, image_config = self._image(get("image", "host"), backend, where)
        cpus = _cpus(get("cpus", 1), where)
        memory = parse_size(get("memory", "512M"), where, "memory")
        disk = None if get("disk") is None else parse_size(get("disk"), where, "disk")
        network = _network(get("network"), where)
        packages = check_packages(get("packages", ()), f"{where}: packages")
        if packages and "base" not in image_config:
            raise ConfigError(
                f"{where}: packages={list(packages)!r} needs an image built from the Debian "
                f"archive, and image {image!r} is not one: use image={_base_hint()} or an "
                '[images.NAME] entry with base = "debian-12" in vmenv.toml'
            )
        return MachineSpec(
            name=name, image=image, backend=backend, cpus=cpus, memory=memory, disk=disk,
            network=network, packages=packages, init=_init(get("init"), where),
            outbound=_flag(get("outbound", False), where, "outbound"),
            provision=_provision(get("provision", ()), where), ready=_ready(get("ready"), where),
            timeout=_timeout(get("timeout", 300), where),
            scope=_choice(get("scope", "function"), SCOPES, "scope", where),
            isolation=_choice(get("isolation", "clone"), ISOLATIONS, "isolation", where),
            labels=_labels(get("labels") or {}, where), image_config=image_config,
        )  # fmt: skip

    def environment(self, env_name: str, where: str) -> list[MachineSpec]:
        """The machines of ``[environments.NAME]``; each joins the environment's network."""
        envs = self.config.environments
        if env_name not in envs:
            choices = ", ".join(sorted(envs)) or "(none defined in vmenv.toml)"
            raise ConfigError(
                f"{where}: unknown environment {env_name!r} ({self.config.where}). "
                f"Choose one of: {choices}"
            )
        table = envs[env_name]
        key = f"environments.{env_name}"
        machines = table.get("machines")
        if not isinstance(machines, Mapping) or not machines:
            raise ConfigError(f"{self.config.where}: {key}.machines must name at least one machine")
        network = table.get("network", "lan")
        specs = []
        for name, entry in machines.items():
            if isinstance(entry, str):
                if entry not in self.config.machines:
                    raise ConfigError(
                        f"{self.config.where}: {key}.machines.{name} = {entry!r} names no "
                        f"[machines.{entry}]. Choose one of: "
                        f"{', '.join(sorted(self.config.machines)) or '(none defined)'}"
                    )
                fields = dict(self.config.machines[entry])
            elif isinstance(entry, Mapping):
                fields = dict(entry)
            else:
                raise ConfigError(
                    f"{self.config.where}: {key}.machines.{name} must be a machine name or a table"
                )
            fields.setdefault("name", name)
            fields.setdefault("network", network)
            specs.append(
                self.machine(fields, f"{where} ({self.config.where}: {key}.machines.{name})")
            )
        return specs

    def _image(self, image: object, backend: str, where: str) -> tuple[str, Mapping[str, Any]]:
        if not isinstance(image, str) or not image:
            raise ConfigError(f"{where}: image={image!r} must be a string")
        if image in self.config.images:
            entries = self.config.images[image]
            if isinstance(entries.get(backend), Mapping):
                return image, _absolute_paths(entries[backend], self.config.base_dir)
            base = entries.get("base")
            if isinstance(base, str) and base in self.backends[backend]:
                return image, {"base": base, "packages": list(entries.get("packages") or ())}
            tables = sorted(k for k, v in entries.items() if isinstance(v, Mapping))
            builds = f" (or a backend that builds {base!r})" if isinstance(base, str) else ""
            raise ConfigError(
                f"{where}: image {image!r} has no entry for backend {backend!r} in "
                f"{self.config.where}; add images.{image}.{backend}, or choose a backend of: "
                f"{', '.join(tables) or '(none)'}{builds}"
            )
        if image in self.backends[backend]:
            return image, ({"base": image, "packages": []} if image in BASES else {})
        path = Path(image)
        if not path.is_absolute():
            path = self.config.base_dir / path
        if path.exists():
            return image, {"rootfs": str(path.resolve())}
        choices = sorted(set(self.backends[backend]) | set(self.config.images))
        raise ConfigError(
            f"{where}: unknown image {image!r} for backend {backend!r}. Choose one of: "
            f"{', '.join(choices)}, or an existing path to a rootfs directory or tarball"
        )


def _name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{where}: name={name!r} is not a machine name. Use letters, digits and '-' "
            "(a hostname label, at most 63 characters)"
        )
    return name


def _cpus(cpus: object, where: str) -> int:
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"{where}: cpus={cpus!r} must be a whole number >= 1, e.g. cpus=2")
    return cpus


def _network(network: object, where: str) -> str | None:
    if network is not None and (not isinstance(network, str) or not network or "#" in network):
        raise ConfigError(f'{where}: network={network!r} must be a name like "lan" or a CIDR')
    return network


def _flag(value: object, where: str, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {field_name}={value!r} must be true or false")
    return value


def _init(init: object, where: str) -> str | None:
    if init is not None and init not in INITS:
        raise ConfigError(
            f"{where}: init={init!r}. Choose one of: {', '.join(INITS)} (or leave it unset "
            "for the image's default: systemd on a built Debian image, else none)"
        )
    return None if init is None else str(init)


def _ready(ready: object, where: str) -> str | None:
    if ready is not None and not isinstance(ready, str):
        raise ConfigError(f'{where}: ready={ready!r} must be a command or "port:N"')
    if isinstance(ready, str) and ready.startswith("port:") and not ready[5:].isdigit():
        raise ConfigError(f"{where}: ready={ready!r}: the port must be a number, e.g. port:22")
    return ready


def _timeout(timeout: object, where: str) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{where}: timeout={timeout!r} must be a positive number of seconds")
    return float(timeout)


def _choice(value: object, choices: Sequence[str], field_name: str, where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {field_name}={value!r}. Choose one of: {', '.join(choices)}")
    return str(value)


def _labels(labels: object, where: str) -> dict[str, str]:
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ConfigError(f"{where}: labels={labels!r} must map strings to strings")
    return dict(labels)


def _base_hint() -> str:
    return " or ".join(repr(b) for b in BASES)


def _provision(value: object, where: str) -> tuple[str | tuple[str, ...], ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: provision={value!r} must be a list of commands")
    steps: list[str | tuple[str, ...]] = []
    for step in value:
        if isinstance(step, str):
            steps.append(step)
        elif isinstance(step, list | tuple) and step and all(isinstance(a, str) for a in step):
            steps.append(tuple(step))
        else:
            raise ConfigError(
                f"{where}: provision step {step!r} must be a shell string or an argv list"
            )
    return tuple(steps)


def _absolute_paths(entry: Mapping[str, Any], base: Path) -> Mapping[str, Any]:
    """Make the path-valued keys of an image entry absolute, relative to the config file."""
    out = dict(entry)
    for key in ("rootfs", "disk", "kernel", "initrd", "path"):
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            out[key] = str(base / value)
    return out
