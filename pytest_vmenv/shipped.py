"""The backends this project ships, and how to install the ones that come separately."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SHIPPED", "install_hint", "not_installed"]

SHIPPED = ("emulator", "libvirt", "vsphere")

_HINTS = {
    "libvirt": "pip install pytest-vmenv-libvirt",
    "kvm": "pip install pytest-vmenv-libvirt",
    "vsphere": "pip install pytest-vmenv-vsphere",
}


def install_hint(name: str) -> str | None:
    """The command that installs the shipped backend ``name`` (None: not one of ours)."""
    return _HINTS.get(name)


def not_installed(name: str, installed: Iterable[str]) -> str:
    """The end of every message that rejects a backend name: "is not installed (how to
    install it, for the backends this project ships). Choose one of: <what is installed>"."""
    hint = ""
    if name in _HINTS:
        alias = " (the libvirt backend)" if name == "kvm" else ""
        hint = f"{alias}; install it with: {_HINTS[name]}"
    choices = ", ".join(sorted(installed)) or "(none)"
    return f"is not installed{hint}. Choose one of: {choices}"
