"""The libvirt backend's one boundary: what each foreign exception becomes, and what passes.

On ``test:///default``, libvirt's in-process driver (no libvirtd needed): its errors are the
real ones (``VIR_ERR_NO_DOMAIN`` for a domain that does not exist).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.agent import AgentError
from vmenv_libvirt.debs import TinyBuildError
from vmenv_libvirt.faults import BOUNDARY
from vmenv_libvirt.remote import channel_config

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef

URI = "test:///default"


@pytest.fixture
def backend(tmp_path: Path) -> LibvirtBackend:
    return LibvirtBackend({"uri": URI, "state_dir": str(tmp_path)})


def gone_ref() -> MachineRef:
    return MachineRef(backend="libvirt", id="vmenv-no-such", name="web", session="s1")


def test_a_call_about_a_machine_that_is_gone_is_machine_gone(backend: LibvirtBackend) -> None:
    with pytest.raises(errors.MachineGone, match=r"libvirt: machine 'web' \(vmenv-no-such\) is"):
        backend.keep(gone_ref())
    backend.destroy(gone_ref())  # already gone is success


def test_other_libvirt_errors_and_ours_say_the_call(backend: LibvirtBackend) -> None:
    @BOUNDARY
    def snapshot(ref: MachineRef) -> None:
        backend.hv.call(lambda c: c.lookupByName(ref.id))

    with pytest.raises(errors.MachineGone):
        snapshot(gone_ref())

    @BOUNDARY
    def lookup() -> None:  # no machine in the call: not MachineGone
        backend.hv.call(lambda c: c.lookupByName("vmenv-no-such"))

    with pytest.raises(
        errors.BackendError, match="libvirt: lookup failed: Domain not found"
    ) as info:
        lookup()
    assert not isinstance(info.value, errors.MachineGone)

    @BOUNDARY
    def execute() -> None:
        raise AgentError("guest-exec: no such file")

    with pytest.raises(errors.BackendError, match="libvirt: execute: guest agent: guest-exec"):
        execute()

    @BOUNDARY
    def build_template() -> None:
        raise TinyBuildError("`mkfs.ext4` is not installed")

    with pytest.raises(errors.BackendError, match="libvirt: building the tiny image: `mkfs"):
        build_template()


def test_our_own_bugs_pass_unchanged() -> None:
    @BOUNDARY
    def clone() -> None:
        raise KeyError("boot")

    with pytest.raises(KeyError):
        clone()


def test_a_bad_number_in_an_image_entry_is_a_config_error(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("unused")
    (tmp_path / "id_ed25519.pub").write_text("ssh-ed25519 AAAA test\n")
    cfg = {"agent": False, "ssh_key": str(key), "ssh_port": "twenty-two"}
    with pytest.raises(errors.ConfigError, match=r"images.web.libvirt.ssh_port = 'twenty-two'"):
        channel_config(cfg, "web", tiny=False)
    assert channel_config({**cfg, "ssh_port": "2222"}, "web", tiny=False)[1]["port"] == 2222
