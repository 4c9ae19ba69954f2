"""A service of your own under systemd: a unit written by provision, enabled, restarted, logged.

Provisioning runs once, in the template's booted machine: the unit is installed and enabled
there, so every clone boots with the service already running.
"""

import pytest

UNIT = """\
[Unit]
Description=Greeter, an example service

[Service]
ExecStart=/usr/local/bin/greeter
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

GREETER = """\
#!/bin/sh
echo "greeter $$ up"
exec sleep infinity
"""


def write(path, text):
    """A provision step that writes ``text`` to ``path`` in the machine."""
    return f"cat > {path} <<'EOF'\n{text}EOF"


pytestmark = pytest.mark.vm(
    image="web",
    provision=[
        write("/usr/local/bin/greeter", GREETER),
        "chmod 755 /usr/local/bin/greeter",
        write("/etc/systemd/system/greeter.service", UNIT),
        "systemctl daemon-reload && systemctl enable --now greeter",
    ],
    ready="systemctl is-active greeter",
)


def main_pid(vm):
    return int(vm.succeed("systemctl show --property=MainPID --value greeter"))


def test_enabled_and_running(vm):
    assert vm.succeed("systemctl is-enabled greeter").strip() == "enabled"
    assert vm.succeed("systemctl is-active greeter").strip() == "active"


def test_restart_and_journal(vm):
    first = main_pid(vm)
    vm.succeed("systemctl restart greeter")
    second = main_pid(vm)
    assert second != first
    log = vm.succeed("journalctl --unit greeter --output cat --no-pager")
    assert f"greeter {first} up" in log and f"greeter {second} up" in log


def test_systemd_restarts_it_after_a_crash(vm):
    crashed = main_pid(vm)
    vm.succeed(f"kill -KILL {crashed}")  # Restart=on-failure: systemd starts it again
    vm.wait_until_succeeds(
        f"systemctl is-active greeter && [ $(systemctl show -P MainPID greeter) != {crashed} ]",
        timeout=10,
    )
    vm.succeed("systemctl stop greeter")
    vm.fail("systemctl is-active greeter")  # inactive: exits 3
