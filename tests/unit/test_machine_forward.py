"""``Machine.forward``/``Machine.url``/``Machine.expose_host_port`` over a backend: the URL,
the cache, the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from pytest_vmenv.backend import Backend, Forwarder, HostExposer, MachineRef
from pytest_vmenv.errors import BackendError, ConfigError
from pytest_vmenv.machine import Machine
from pytest_vmenv.spec import MachineSpec

REF = MachineRef(backend="fake", id="m1", name="web", session="s")


class _NoForward:
    name = "libvirt"


class _Forwarding:
    name = "fake"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.calls: list[tuple[str, int, str]] = []

    def forward(self, ref: MachineRef, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        self.calls.append((ref.id, port, host))
        return (self.host, 40000 + port)


def _machine(backend: object, tmp_path: Path) -> Machine:
    return Machine(cast(Backend, backend), REF, MachineSpec(name="web"), tmp_path)


def test_the_protocol_is_recognised() -> None:
    assert isinstance(_Forwarding(), Forwarder)
    assert not isinstance(_NoForward(), Forwarder)


def test_url_is_built_on_forward_and_asks_the_backend_once(tmp_path: Path) -> None:
    backend = _Forwarding()
    vm = _machine(backend, tmp_path)
    assert vm.url(8080, "health") == "http://127.0.0.1:48080/health"
    assert vm.url(8080, "/a?b=1", scheme="https") == "https://127.0.0.1:48080/a?b=1"
    assert vm.url() == "http://127.0.0.1:40080/"
    assert vm.forward(8080) == ("127.0.0.1", 48080)
    assert backend.calls == [("m1", 8080, "127.0.0.1"), ("m1", 80, "127.0.0.1")]


def test_an_ipv6_address_is_bracketed(tmp_path: Path) -> None:
    vm = _machine(_Forwarding("::1"), tmp_path)
    assert vm.url(80) == "http://[::1]:40080/"


def test_a_backend_without_forwarding_says_so(tmp_path: Path) -> None:
    vm = _machine(_NoForward(), tmp_path)
    with pytest.raises(BackendError, match="'libvirt' backend cannot forward ports yet") as exc:
        vm.url(80)
    assert "later release" in str(exc.value)


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80"])
def test_a_bad_port_is_a_config_error(tmp_path: Path, port: Any) -> None:
    backend = _Forwarding()
    with pytest.raises(ConfigError, match=r"1\.\.65535"):
        _machine(backend, tmp_path).forward(port)
    assert backend.calls == []


class _Exposing:
    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def expose_host_port(self, ref: MachineRef, port: int) -> tuple[str, int]:
        self.calls.append((ref.id, port))
        return ("127.0.0.1", port)


def test_expose_host_port_asks_the_backend_once_per_port(tmp_path: Path) -> None:
    backend = _Exposing()
    assert isinstance(backend, HostExposer)
    assert not isinstance(_Forwarding(), HostExposer)
    vm = _machine(backend, tmp_path)
    assert vm.expose_host_port(9000) == ("127.0.0.1", 9000)
    assert vm.expose_host_port(9000) == ("127.0.0.1", 9000)
    assert vm.expose_host_port(9001) == ("127.0.0.1", 9001)
    assert backend.calls == [("m1", 9000), ("m1", 9001)]


def test_a_backend_without_expose_host_port_says_so(tmp_path: Path) -> None:
    vm = _machine(_Forwarding(), tmp_path)
    with pytest.raises(BackendError, match="'fake' backend cannot expose host ports yet") as exc:
        vm.expose_host_port(9000)
    assert "backend='emulator'" in str(exc.value)


@pytest.mark.parametrize("port", [0, 65536, True, "80"])
def test_expose_host_port_refuses_a_bad_port(tmp_path: Path, port: Any) -> None:
    backend = _Exposing()
    with pytest.raises(ConfigError, match=r"expose_host_port\(port\): a TCP port 1\.\.65535"):
        _machine(backend, tmp_path).expose_host_port(port)
    assert backend.calls == []
