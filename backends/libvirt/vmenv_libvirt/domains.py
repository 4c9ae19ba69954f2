"""Domain XML (Jinja2 templates shipped in the package), labels, and the plugin's disk pool.

Contract:

* :func:`render_domain` renders ``templates/domain.xml.j2`` (or a user's own template, the
  ``domain_xml`` option) with the variables documented at its top.
* Every domain carries a ``<vmenv:machine>`` element in ``<metadata>`` (namespace
  :data:`NS`): session id, owner token, created, kept, the machine's name, its role
  (``clone``, ``template``, ``state``) and the paths of what it owns (disk, console, network).
  :func:`read_labels` parses it back: that is how ``owned()`` and ``destroy`` work from any
  process, with no record but libvirt's own.
* :class:`Pool` is a ``dir`` storage pool under the state dir, one per state dir (its name
  carries a hash of the path). Overlays are created through the storage API with a
  ``<backingStore>``; removal is idempotent.
* :data:`READY_SNAPSHOT` is the internal snapshot with RAM a fast clone starts from
  (:func:`snapshot_xml` describes one to ``snapshotCreateXML``).
"""

from __future__ import annotations

import hashlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import jinja2
import libvirt  # type: ignore[import-untyped]

from pytest_vmenv.backend import Session

from .config import Paths
from .connection import Hypervisor, is_gone
from .forwards import MAC, NETDEV

__all__ = [
    "NS",
    "READY_SNAPSHOT",
    "REVERT_RUNNING",
    "Pool",
    "labels_xml",
    "machine_labels",
    "read_labels",
    "image_format",
    "render_domain",
    "set_labels",
    "snapshot_xml",
]

READY_SNAPSHOT = "vmenv-ready"
REVERT_RUNNING = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING

NS = "https://github.com/pytest-vmenv/libvirt/1"
_LABEL_KEYS = (
    "state",
    "session",
    "owner",
    "created",
    "kept",
    "name",
    "role",
    "template",
    "disk",
    "console",
    "network",
    "ram",
    "uri",
    "ip",
    "channel",
    "ssh_user",
    "ssh_key",
    "ssh_port",
)
_env: jinja2.Environment | None = None
_env_lock = threading.Lock()


def _environment() -> jinja2.Environment:
    global _env
    with _env_lock:
        if _env is None:
            _env = jinja2.Environment(
                loader=jinja2.PackageLoader("vmenv_libvirt", "templates"),
                autoescape=jinja2.select_autoescape(default=False),
                undefined=jinja2.StrictUndefined,
                keep_trailing_newline=True,
            )
        return _env


def render(template: str, **variables: Any) -> str:
    """Render one of the package's templates (values are XML-escaped where they are text)."""
    return _environment().get_template(template).render(**variables)


def render_domain(custom: Path | None, **variables: Any) -> str:
    """The domain XML: the package's ``domain.xml.j2``, or the user's ``custom`` template."""
    safe = {
        k: escape(v) if isinstance(v, str) and k != "metadata" else v for k, v in variables.items()
    }
    safe.setdefault("seed", None)
    safe.setdefault("network", None)
    safe.setdefault("mac", None)
    safe.setdefault("controller", "virtio")
    safe.setdefault("on_reboot", "restart")
    safe.setdefault("forward_netdev", NETDEV)
    safe.setdefault("forward_mac", MAC)
    if custom is not None:
        text = custom.read_text()
        return _environment().from_string(text).render(**safe)
    return render("domain.xml.j2", **safe)


def snapshot_xml(name: str) -> str:
    """A ``<domainsnapshot>`` named ``name`` that keeps the RAM (internal snapshot)."""
    return f"<domainsnapshot><name>{name}</name><memory snapshot='internal'/></domainsnapshot>"


def machine_labels(
    session: Session, state: Path, name: str, role: str, **extra: object
) -> dict[str, object]:
    """The labels of a new domain of ``session``: machine ``name`` in ``role``, and ``extra``;
    ``state`` is the backend's own state dir (its ``Paths``), the one ``owned()`` matches."""
    return {
        "state": str(state.resolve()),
        "session": session.id,
        "owner": session.owner,
        "created": f"{time.time():.3f}",
        "kept": "0",
        "name": name,
        "role": role,
        **extra,
    }


def labels_xml(labels: Mapping[str, object], declare: bool = True) -> str:
    """The ``<vmenv:machine>`` metadata element for ``labels``.

    ``declare=False`` gives the bare element that ``virDomainSetMetadata`` wants (it adds
    the namespace itself and refuses an element that declares it).
    """
    p = "vmenv:" if declare else ""
    body = "".join(
        f"<{p}{k}>{escape(str(labels[k]))}</{p}{k}>"
        for k in _LABEL_KEYS
        if labels.get(k) not in (None, "")
    )
    xmlns = f' xmlns:vmenv="{NS}"' if declare else ""
    return f"<{p}machine{xmlns}>{body}</{p}machine>"


def read_labels(dom: libvirt.virDomain) -> dict[str, str] | None:
    """The labels of ``dom``, or None if it carries none (not ours)."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
    except libvirt.libvirtError:
        return None
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    return {child.tag.rpartition("}")[2]: child.text or "" for child in root}


def set_labels(dom: libvirt.virDomain, labels: Mapping[str, object]) -> None:
    """Replace ``dom``'s labels (in its persistent definition, and live while it runs)."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, labels_xml(labels, declare=False), "vmenv", NS, flags
    )


class Pool:
    """The plugin's ``dir`` storage pool at ``paths.pool`` (created and started on first use)."""

    def __init__(self, hv: Hypervisor, paths: Paths) -> None:
        self.hv = hv
        self.paths = paths
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.paths.pool

    @property
    def name(self) -> str:
        return f"vmenv-{hashlib.sha256(str(self.path).encode()).hexdigest()[:10]}"

    def _pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        with self._lock:
            try:
                pool = conn.storagePoolLookupByName(self.name)
            except libvirt.libvirtError as exc:
                if not is_gone(exc) and exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise
                self.path.mkdir(parents=True, exist_ok=True)
                xml = render("pool.xml.j2", name=escape(self.name), path=escape(str(self.path)))
                try:
                    pool = conn.storagePoolCreateXML(xml, 0)  # transient: nothing to undefine
                except libvirt.libvirtError:
                    pool = conn.storagePoolLookupByName(self.name)  # another process won
            if not pool.isActive():
                pool.create(0)
            return pool

    def create_overlay(self, name: str, backing: Path, capacity: int | None = None) -> Path:
        """A new qcow2 volume ``name`` backed by ``backing`` (read-only); its path."""
        fmt, info = image_format(backing)
        size = max(capacity or 0, info)

        def create(conn: libvirt.virConnect) -> str:
            pool = self._pool(conn)
            xml = render(
                "volume.xml.j2",
                name=escape(name),
                capacity=size,
                backing=escape(str(backing)),
                backing_format=fmt,
            )
            try:
                vol = pool.createXML(xml, 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                    raise
                pool.storageVolLookupByName(name).delete(0)
                vol = pool.createXML(xml, 0)
            return str(vol.path())

        return Path(self.hv.call(create))

    def delete(self, path: Path) -> None:
        """Delete the volume at ``path``; already gone is success."""

        def delete(conn: libvirt.virConnect) -> None:
            pool = self._pool(conn)
            try:
                vol = pool.storageVolLookupByName(path.name)
            except libvirt.libvirtError:
                try:
                    pool.refresh(0)
                    vol = pool.storageVolLookupByName(path.name)
                except libvirt.libvirtError:
                    path.unlink(missing_ok=True)
                    return
            try:
                vol.delete(0)
            except libvirt.libvirtError as exc:
                if not is_gone(exc):
                    raise

        if path.parent == self.path:
            self.hv.call(delete)
        else:
            path.unlink(missing_ok=True)


def image_format(path: Path) -> tuple[str, int]:
    """("qcow2", virtual size) from a qcow2 header, ("vmdk", capacity) from a sparse VMDK
    extent's header (monolithicSparse, streamOptimized), else ("raw", file size)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] == b"QFI\xfb":
        return "qcow2", int.from_bytes(head[24:32], "big")
    if head[:4] == b"KDMV":
        return "vmdk", int.from_bytes(head[12:20], "little") * 512
    return "raw", path.stat().st_size
