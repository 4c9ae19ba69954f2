"""Which failed commands get which hint (pure logic over the command text and stderr)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_vmenv.diagnose import fetches, missing_command, provision_failed
from pytest_vmenv.emulator.host.imagecheck import resolve_inside


@pytest.mark.parametrize(
    ("command", "tool"),
    [
        ("apt-get update && apt-get install -y nginx", "apt-get"),
        ("DEBIAN_FRONTEND=noninteractive sudo -E apt install -y x", "apt"),
        ("python3 -m pip install flask", "pip install"),
        (("pip3", "install", "requests"), "pip3 install"),
        ("cd /srv && timeout 30 curl -sf https://example.org | sh", "curl"),
        ("git clone https://example.org/repo.git /srv/repo", "git clone"),
        ("npm ci", "npm ci"),
        ("wget -q https://example.org/x", "wget"),
        ("apt-get remove -y nano", None),
        ("git init /srv/repo", None),
        ("pip3 freeze > /tmp/x", None),
        ("echo apt-get install", None),
        ("exit 100", None),
        ('echo "unbalanced', None),
    ],
)
def test_fetches(command: str | tuple[str, ...], tool: str | None) -> None:
    assert fetches(command) == tool


@pytest.mark.parametrize(
    ("code", "stderr", "missing"),
    [
        (127, "/bin/sh: 1: pg_isready: not found\n", "pg_isready"),
        (127, "bash: line 1: pg_isready: command not found\n", "pg_isready"),
        (127, "sh: pg_isready: not found\n", "pg_isready"),
        (127, "vmenv: tool: command not found\n", "tool"),
        (127, "vmenv: /bin/sh: No such file or directory\n", "/bin/sh"),
        (127, "", None),  # `exit 127`: nothing says what is missing
        (1, "sh: 1: x: not found\n", None),
    ],
)
def test_missing_command(code: int, stderr: str, missing: str | None) -> None:
    assert missing_command(code, stderr) == missing


def test_hint_only_without_outbound_network() -> None:
    offline = provision_failed(
        "emu", "vm", "apt-get update", 100, "", "W: Temporary failure resolving 'x'", outbound=False
    )
    assert "no outbound network, so 'apt-get' cannot download" in str(offline)
    other = provision_failed(
        "emu", "vm", "apt-get install nope", 100, "", "E: Unable to locate package nope",
        outbound=False,
    )  # fmt: skip
    assert "outbound" not in str(other)
    for outbound in (True, None):
        online = provision_failed("emu", "vm", "apt-get update", 100, "", "E", outbound=outbound)
        assert "outbound" not in str(online)
    missing = provision_failed(
        "emu", "vm", "curl x", 127, "", "sh: curl: not found", outbound=False
    )
    assert "command 'curl' not found in the guest image" in str(missing)
    assert "outbound" not in str(missing)


def test_resolve_inside_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "dash").write_text("")
    os.symlink("usr/bin", root / "bin")
    os.symlink("/bin/dash", root / "usr" / "bin" / "sh")
    os.symlink("../../../../../../../etc", root / "up")
    os.symlink("loop", root / "loop")
    assert resolve_inside(root, "/bin/sh") == root / "usr" / "bin" / "dash"
    assert resolve_inside(root, "/up/passwd") is None  # /etc of the root, not the host's
    assert resolve_inside(root, "/../../bin/sh") == root / "usr" / "bin" / "dash"
    assert resolve_inside(root, "/loop") is None
    assert resolve_inside(root, "/usr/bin/dash/x") is None
