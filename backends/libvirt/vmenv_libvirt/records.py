"""Template records: what ``build_template`` made, in ``<state>/libvirt/templates/KEY.json``.

Contract: a record is written once, complete, by an atomic rename (a build that dies half way
leaves none); it holds the template's disk, its RAM-state overlay (or ""), how it boots, the
channel it talks (``boot.ssh`` for SSH images), the spec's cpus/memory and who built it.
:meth:`Records.snapshot` is the :class:`Snapshot` the protocol hands out for it, its typed
fields (``session``, ``owner``, ``created``, ``reuse``, ``complete``) set from the record;
``data`` holds the record too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_vmenv import errors
from pytest_vmenv.backend import Snapshot
from pytest_vmenv.ledger import write_json

from .config import Paths
from .connection import NAME

__all__ = ["Records"]


class Records:
    """The template records under ``paths`` (any process's)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def load(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None if there is none (or it is unreadable)."""
        try:
            data = json.loads(self.paths.record(key).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save(self, key: str, record: Mapping[str, Any]) -> None:
        write_json(self.paths.record(key), record)

    def delete(self, key: str) -> None:
        self.paths.record(key).unlink(missing_ok=True)

    @staticmethod
    def snapshot(record: Mapping[str, Any]) -> Snapshot:
        return Snapshot(
            backend=NAME,
            name=str(record["name"]),
            handle=str(record["disk"]),
            key=str(record["key"]),
            data=dict(record),
            session=str(record.get("session", "")),
            owner=str(record.get("owner", "")),
            created=float(record.get("created") or 0.0),
            reuse=bool(record.get("reuse", False)),
            complete=bool(record.get("complete", False)),
        )

    def listed(self) -> list[Snapshot]:
        """Every template with a record, of any session."""
        found = []
        for path in sorted((self.paths.root / "templates").glob("*.json")):
            record = self.load(path.stem)
            if record is not None and {"key", "name", "disk"} <= record.keys():
                found.append(self.snapshot(record))
        return found

    def require(self, snapshot: Snapshot) -> Mapping[str, Any]:
        """The record of ``snapshot``, whose disk exists; BackendError if it is gone."""
        record = self.load(snapshot.key) or dict(snapshot.data)
        if not record.get("disk") or not Path(str(record["disk"])).exists():
            raise errors.BackendError(
                f"{NAME}: template {snapshot.key!r} is gone (its disk {snapshot.handle} does "
                "not exist); it was removed or never completed"
            )
        if not isinstance(record.get("boot"), Mapping):
            raise errors.BackendError(
                f"{NAME}: template {snapshot.key!r} has no boot entry in its record "
                f"({self.paths.record(snapshot.key)}): remove it (`vmenv images rm "
                f"{snapshot.key}`) and build it again"
            )
        return record
