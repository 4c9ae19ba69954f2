"""A template is not deleted while a clone is built on it (its disk is the clone's backing).

Runs on ``test:///default``, libvirt's own in-process driver (no libvirtd needed): real
domains carrying the backend's labels in their ``<metadata>``, listed through the same API
calls as on ``qemu:///system``; the template's disk is a real file.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.domains import labels_xml

from pytest_vmenv import cli
from pytest_vmenv.backend import Snapshot, owner_token
from pytest_vmenv.errors import TemplateInUse

URI = "test:///default"


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(URI)  # the same in-process driver state as the backend's connection
    yield conn
    conn.close()


@pytest.fixture
def domains(conn: libvirt.virConnect) -> Iterator[list[libvirt.virDomain]]:
    made: list[libvirt.virDomain] = []
    yield made
    for dom in made:
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()  # already undefined: fine


def define(
    conn: libvirt.virConnect, made: list[libvirt.virDomain], name: str, **labels: str
) -> libvirt.virDomain:
    metadata = labels_xml({"session": "s1", "owner": "", "name": "web", **labels})
    dom = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        f"<os><type>hvm</type></os><metadata>{metadata}</metadata></domain>"
    )
    made.append(dom)
    return dom


def a_template(backend: LibvirtBackend) -> tuple[Snapshot, Path]:
    """A complete template record of a dead session and its disk in the plugin's pool."""
    key = "key-" + secrets.token_hex(4)
    disk = backend.parts.paths.root / "pool" / f"tpl-{key}.qcow2"
    disk.write_bytes(b"QFI\xfb" + bytes(60))
    backend.parts.records.save(key, {"key": key, "name": "web", "disk": str(disk), "ram": "",
                                     "session": "s1", "owner": "", "created": 0.0,
                                     "reuse": False, "complete": True})  # fmt: skip
    (template,) = [t for t in backend.templates() if t.key == key]
    return template, disk


def test_a_template_a_kept_clone_is_built_on_is_left_until_the_clone_is_gone(
    tmp_path: Path, conn: libvirt.virConnect, domains: list[libvirt.virDomain]
) -> None:
    backend = LibvirtBackend({"uri": URI, "state_dir": str(tmp_path)})
    try:
        template, disk = a_template(backend)
        key = template.key
        define(conn, domains, f"vmenv-tpl-{key}", role="template", template=key)  # not a holder
        clone = define(conn, domains, f"vmenv-web-{key}", role="clone", template=key, kept="1")
        with pytest.raises(TemplateInUse) as info:
            backend.remove_template(template)
        assert info.value.holder == f"machine web (vmenv-web-{key}) on {URI} is built on it"
        assert disk.exists() and backend.parts.records.load(key) is not None
        clone.undefine()
        backend.remove_template(template)
        assert not disk.exists() and backend.parts.records.load(key) is None
        backend.remove_template(template)  # already gone: fine
    finally:
        backend.close()


def test_images_rm_says_a_template_a_clone_is_built_on_is_in_use(
    tmp_path: Path,
    conn: libvirt.virConnect,
    domains: list[libvirt.virDomain],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("VMENV_STATE_DIR", str(state))
    (tmp_path / "vmenv.toml").write_text(f'[backends.libvirt]\nuri = "{URI}"\n')
    monkeypatch.chdir(tmp_path)  # `vmenv` reads the backend options from ./vmenv.toml
    backend = LibvirtBackend({"uri": URI, "state_dir": str(state)})
    template, disk = a_template(backend)
    backend.close()
    clone = define(conn, domains, f"vmenv-web-{template.key}", role="clone", template=template.key)

    assert cli.main(["images", "rm", template.key]) == 1  # named, and in use
    out = capsys.readouterr().out
    assert (
        f"left template {template.key}: in use: machine web (vmenv-web-{template.key}) on {URI} "
        "is built on it\n" in out
    ), out
    assert "error" not in out and disk.exists()
    clone.undefine()
    assert cli.main(["images", "rm", template.key]) == 0
    assert f"removed libvirt template {template.key}" in capsys.readouterr().out
    assert not disk.exists()


def test_gc_leaves_the_template_of_a_kept_clone_and_gc_all_removes_both(
    tmp_path: Path,
    conn: libvirt.virConnect,
    domains: list[libvirt.virDomain],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The session that made them is dead: plain `vmenv gc` spares the kept clone and so its
    template; `vmenv gc --all` removes the clone, then the template it was built on."""
    state = tmp_path / "state"
    monkeypatch.setenv("VMENV_STATE_DIR", str(state))
    (tmp_path / "vmenv.toml").write_text(f'[backends.libvirt]\nuri = "{URI}"\n')
    monkeypatch.chdir(tmp_path)
    backend = LibvirtBackend({"uri": URI, "state_dir": str(state)})
    template, disk = a_template(backend)
    dead = f"{owner_token().partition(':')[0]}:{2**22 + 1}:0"  # no such process
    backend.parts.records.save(
        template.key, {**backend.parts.records.load(template.key), "owner": dead}
    )
    clone_disk = backend.parts.paths.root / "pool" / f"vmenv-web-{template.key}.qcow2"
    clone_disk.write_bytes(b"QFI\xfb" + bytes(60))
    backend.close()
    name = f"vmenv-web-{template.key}"
    define(conn, domains, name, role="clone", template=template.key, kept="1", owner=dead,
           disk=str(clone_disk))  # fmt: skip

    assert cli.main(["gc"]) == 0
    out = capsys.readouterr().out
    assert f"left libvirt template {template.key}: in use: machine web ({name})" in out, out
    assert disk.exists() and name in {d.name() for d in conn.listAllDomains(0)}
    assert cli.main(["gc", "--all"]) == 0
    out = capsys.readouterr().out
    assert f"removed libvirt machine web ({name})" in out, out
    assert f"removed libvirt template {template.key}" in out, out
    assert not disk.exists() and not clone_disk.exists()
    assert name not in {d.name() for d in conn.listAllDomains(0)}
