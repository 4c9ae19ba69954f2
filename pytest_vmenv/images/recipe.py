"""Image recipes: a Debian release plus packages, and the key of the image they build.

A recipe is backend-neutral: ``image="debian-12"`` (a built-in base), or a config entry
``[images.NAME] base = "debian-12", packages = [...]``, plus the ``packages=`` of a machine.
What shapes the built tree is the key: the recipe version (bumped whenever the way a tree is
built changes), the suite, the sorted package list, the init and the archive lines
(:mod:`.sources`). Two recipes with one key are one image, built once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ConfigError

__all__ = [
    "BASES",
    "INITS",
    "PACKAGE_RULE",
    "RECIPE_VERSION",
    "Recipe",
    "check_packages",
    "recipe_of",
]

BASES: Mapping[str, str] = {"debian-12": "bookworm"}
"""Built-in bases: image name -> the Debian suite it is built from."""

INITS = ("systemd", "none")
RECIPE_VERSION = 1
INIT_PACKAGES: Mapping[str, tuple[str, ...]] = {"systemd": ("systemd-sysv", "dbus"), "none": ()}
"""What each init adds to a minbase tree (systemd as /sbin/init, and the system bus)."""

PACKAGE_RULE = (
    "a Debian package name has lower-case letters, digits, '+', '-' and '.', at least two "
    "characters, and starts with a letter or digit"
)
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def check_packages(value: object, where: str) -> tuple[str, ...]:
    """``value`` as a tuple of Debian package names; ConfigError naming ``where`` otherwise."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(
            f'{where}={value!r} must be a list of Debian package names, e.g. ["nginx", "cron"]'
        )
    for name in value:
        if not isinstance(name, str) or not _PACKAGE_RE.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not a package name ({PACKAGE_RULE})")
    return tuple(value)


@dataclass(frozen=True)
class Recipe:
    """One image to build: ``base`` (a key of :data:`BASES`), the packages, the init."""

    base: str
    packages: tuple[str, ...] = ()
    init: str = "systemd"

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ConfigError(
                f"image base {self.base!r} is not built in. Choose one of: {', '.join(BASES)}"
            )
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}. Choose one of: {', '.join(INITS)}")
        object.__setattr__(self, "packages", tuple(sorted(set(self.packages))))

    @property
    def suite(self) -> str:
        return BASES[self.base]

    def includes(self) -> tuple[str, ...]:
        """Every package given to ``mmdebstrap --include``: the init's and the recipe's."""
        return tuple(sorted(set(self.packages) | set(INIT_PACKAGES[self.init])))

    def describe(self) -> str:
        """``debian-12 + cron, nginx (systemd)``: what the user asked for, in one line."""
        extra = f" + {', '.join(self.packages)}" if self.packages else ""
        return f"{self.base}{extra} ({'systemd' if self.init == 'systemd' else 'no init'})"

    def key(self, mirrors: Sequence[str]) -> str:
        """The image key: a hash of everything that shapes the tree."""
        shape: dict[str, Any] = {
            "version": RECIPE_VERSION,
            "suite": self.suite,
            "packages": list(self.packages),
            "init": self.init,
            "mirrors": list(mirrors),
        }
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:24]

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "packages": list(self.packages), "init": self.init}


class _ImageFields(Protocol):
    """What :func:`recipe_of` reads of a :class:`~pytest_vmenv.spec.MachineSpec`."""

    @property
    def image_config(self) -> Mapping[str, Any]: ...
    @property
    def packages(self) -> Sequence[str]: ...
    @property
    def init(self) -> str | None: ...


def recipe_of(spec: _ImageFields) -> Recipe | None:
    """The recipe a machine's image is built from, or None (a ready-made rootfs, ``host``).

    ``spec.image_config`` carries ``base`` (and the entry's ``packages``) for a recipe image;
    the machine's own ``packages`` are added, and ``init`` None means systemd (the default
    of a built Debian image).
    """
    base = spec.image_config.get("base")
    if not isinstance(base, str):
        return None
    packages = tuple(spec.image_config.get("packages") or ()) + tuple(spec.packages)
    return Recipe(base=base, packages=packages, init=spec.init or "systemd")
