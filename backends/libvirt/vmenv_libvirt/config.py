"""The backend's options and where it keeps its files.

Contract: :meth:`LibvirtConfig.load` reads ``[tool.vmenv.backends.libvirt]``: ``uri`` (a
string or a list: the scale-out path), ``accel`` (``auto``/``kvm``/``tcg``), ``ram_state``
(the RAM-state fast path, default true), ``domain_xml`` (your own Jinja2 domain template),
``state_dir``; a bad value is a ``ConfigError`` that names it. :class:`Paths` resolves the
state dir on first use (so that making a backend touches no disk) and lays out
``<state>/libvirt/``: ``consoles/`` (one log per domain), ``templates/`` (records),
``pool/`` (the storage pool's volumes) and ``images/`` (the tiny images). :func:`locked`
serialises processes on one of its files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_vmenv import errors

from .connection import NAME

__all__ = ["ACCELS", "LibvirtConfig", "Paths"]

ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class LibvirtConfig:
    """The options of one backend (see the module docstring)."""

    uris: tuple[str, ...]
    accel: str = "auto"
    ram_state: bool = True
    domain_xml: Path | None = None
    state_dir: Path | None = None

    @classmethod
    def load(cls, options: Mapping[str, Any], state_dir: Path | None = None) -> LibvirtConfig:
        default = "qemu:///system" if os.geteuid() == 0 else "qemu:///session"
        uri = options.get("uri") or default
        uris = (uri,) if isinstance(uri, str) else tuple(str(u) for u in uri)
        accel = str(options.get("accel", "auto"))
        if accel not in ACCELS:
            raise errors.ConfigError(f"{NAME}: accel={accel!r}. Choose one of: {', '.join(ACCELS)}")
        custom = options.get("domain_xml")
        if state_dir is None and options.get("state_dir"):
            state_dir = Path(str(options["state_dir"]))
        return cls(
            uris=uris,
            accel=accel,
            ram_state=bool(options.get("ram_state", True)),
            domain_xml=Path(str(custom)) if custom else None,
            state_dir=state_dir,
        )


class Paths:
    """``<state>/libvirt/`` and what is in it; the state dir is resolved on first use."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self._state = state_dir

    @property
    def state_dir(self) -> Path:
        if self._state is None:
            from pytest_vmenv.paths import state_dir

            self._state = state_dir()
        return self._state

    @property
    def root(self) -> Path:
        """``<state>/libvirt`` with its subdirectories (created when missing)."""
        path = self.state_dir / "libvirt"
        for sub in ("consoles", "templates", "pool"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def pool(self) -> Path:
        return self.root / "pool"

    def record(self, key: str) -> Path:
        """Where the record of template ``key`` is kept."""
        return self.root / "templates" / f"{key}.json"

    def console(self, dom: str) -> Path:
        """The serial console log of domain ``dom``."""
        return self.root / "consoles" / f"{dom}.log"

    def console_tail(self, dom: str, size: int = 8192) -> str:
        """The last ``size`` bytes of ``dom``'s console log ("" if it has none)."""
        try:
            with open(self.console(dom), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""
