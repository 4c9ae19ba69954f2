"""Debian packages taken apart on the host: what the tiny image is made of.

Contract: :func:`download` fetches packages with ``apt-get download`` (the host's configured
Debian mirror, nothing else), :func:`extract` unpacks one with ``dpkg-deb -x``,
:func:`libraries` lists the shared libraries ``ldd`` resolves a binary to, and :func:`run`
runs a build tool. Every failure is a :class:`TinyBuildError` that says what to do.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

__all__ = ["TinyBuildError", "download", "extract", "libraries", "run"]


class TinyBuildError(RuntimeError):
    """The tiny image could not be built here (the message says why and what to do)."""


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """``argv``'s stdout; TinyBuildError with its stderr when it fails or is not installed."""
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as exc:
        raise TinyBuildError(f"`{argv[0]}` is not installed ({exc})") from None
    except subprocess.TimeoutExpired as exc:
        raise TinyBuildError(f"`{' '.join(argv)}` did not finish in {exc.timeout:g}s") from None
    if done.returncode != 0:
        raise TinyBuildError(
            f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def download(packages: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` each package into ``dest``; name -> .deb path."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages], dest)
    except TinyBuildError as exc:
        raise TinyBuildError(
            f"{exc}. The tiny image is built from Debian packages: run `apt-get update` "
            "(and check the apt sources) and retry"
        ) from None
    found: dict[str, Path] = {}
    for deb in dest.glob("*.deb"):
        found[run(["dpkg-deb", "-f", str(deb), "Package"]).strip()] = deb
    missing = [p for p in packages if p not in found]
    if missing:
        raise TinyBuildError(f"apt-get download did not fetch {missing}")
    return found


def extract(deb: Path, dest: Path) -> Path:
    """Unpack ``deb`` into the new directory ``dest``; ``dest``."""
    dest.mkdir(parents=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def libraries(binary: Path, libdirs: tuple[Path, ...] = ()) -> list[str]:
    """The absolute paths ``ldd`` resolves ``binary``'s libraries to, loader included
    (``libdirs``: extracted packages' library directories, searched first)."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs)}
    out = run(["ldd", str(binary)], env=env if libdirs else None)
    libs = []
    for line in out.splitlines():
        if "not found" in line:
            raise TinyBuildError(f"{binary.name} needs a library the host lacks: {line.strip()}")
        match = re.search(r"(/\S+)", line.split("=>")[-1])
        if match:
            libs.append(match.group(1))
    return libs
