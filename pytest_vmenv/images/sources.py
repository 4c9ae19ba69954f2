"""The Debian archive as the host's apt is configured: where images are built from.

Images are only ever built from what the host's apt already uses: ``/etc/apt/sources.list``
and ``/etc/apt/sources.list.d/*.list`` (one-line style) and ``*.sources`` (deb822 style).
No archive address is built in. For a suite (``bookworm``) the lines kept are the ``deb``
entries of that suite and of its companions (``bookworm-updates``, ``bookworm-security``),
rendered in one-line style for ``mmdebstrap``; they are part of the image key, so another
mirror makes another image.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["Source", "host_sources", "mirrors_for"]

APT = Path("/etc/apt")
_OPTION_FIELDS = {"signed-by": "signed-by", "architectures": "arch", "trusted": "trusted"}


@dataclass(frozen=True)
class Source:
    """One ``deb`` entry for one suite: ``deb [options] URI SUITE COMPONENTS``."""

    uri: str
    suite: str
    components: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()
    origin: str = ""  # the file it came from

    def line(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.options)
        return " ".join(
            part for part in ("deb", f"[{opts}]" if opts else "", self.uri, self.suite,
                              *self.components) if part
        )  # fmt: skip


def _one_line(path: Path, text: str) -> Iterator[Source]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind != "deb":
            continue
        options: list[tuple[str, str]] = []
        rest = rest.strip()
        if rest.startswith("["):
            inside, _, rest = rest[1:].partition("]")
            for item in inside.split():
                key, _, value = item.partition("=")
                options.append((key, value))
        parts = rest.split()
        if len(parts) >= 2:
            yield Source(parts[0], parts[1], tuple(parts[2:]), tuple(options), str(path))


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    name = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, name = {}, ""
            continue
        if raw[0] in " \t" and name:  # a continuation line (an inline key, say)
            fields[name] += "\n" + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if sep:
            name = key.strip().lower()
            fields[name] = value.strip()


def _deb822(path: Path, text: str) -> Iterator[Source]:
    for fields in _stanzas(text):
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        options = []
        for field, option in _OPTION_FIELDS.items():
            value = fields.get(field, "")
            if value and "\n" not in value:  # an inline key block is left to mmdebstrap
                options.append((option, ",".join(value.split())))
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                yield Source(uri, suite, components, tuple(options), str(path))


def host_sources(apt: Path = APT) -> list[Source]:
    """Every ``deb`` entry apt reads on this host, in apt's order."""
    files = [apt / "sources.list"]
    with contextlib.suppress(OSError):
        files += sorted(p for p in (apt / "sources.list.d").iterdir() if p.is_file())
    found: list[Source] = []
    for path in files:
        if path.suffix not in (".list", ".sources"):
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        found += _deb822(path, text) if path.suffix == ".sources" else _one_line(path, text)
    return found


def mirrors_for(suite: str, sources: list[Source], base: str = "") -> list[str]:
    """The one-line entries for ``suite`` and its ``-updates``/``-security`` companions.

    ConfigError (what to add, and where) when the host's apt has no entry for the suite.
    """
    companion = re.compile(rf"{re.escape(suite)}(-[a-z]+)?")
    lines = []
    for source in sources:
        if companion.fullmatch(source.suite) and source.line() not in lines:
            lines.append(source.line())
    if not any(s.suite == suite for s in sources):
        name = f"{base} ({suite})" if base else suite
        raise ConfigError(
            f"image {name} is built from the Debian archive as the host's apt is configured, "
            f"but {APT}/sources.list and {APT}/sources.list.d/ have no 'deb' entry for suite "
            f"{suite!r}: add one (e.g. a deb822 file with 'Types: deb', 'URIs: <your Debian "
            f"mirror>', 'Suites: {suite}', 'Components: main')"
        )
    return lines
