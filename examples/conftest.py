"""Run as a normal user, examples the emulator cannot make here are skipped with the reason.

The examples boot Debian 12 machines with systemd, some on a private network. The emulator
makes them as root; unprivileged it makes what it can in a user namespace and refuses the
rest with its reason (e.g. `network=` needs root). As non-root, ``--vm-unavailable``
therefore defaults to ``skip`` here: each refused test is skipped with the plugin's reason
(listed by ``-rs`` in pytest.ini). An explicit ``--vm-unavailable``, ``VMENV_UNAVAILABLE``
or ``vmenv_unavailable`` still wins; as root nothing changes.
"""

import os

import pytest


@pytest.hookimpl(tryfirst=True)  # before pytest-vmenv reads its options
def pytest_configure(config):
    explicit = (
        config.getoption("vm_unavailable")
        or os.environ.get("VMENV_UNAVAILABLE")
        or config.getini("vmenv_unavailable")
    )
    if os.geteuid() != 0 and not explicit:
        config.option.vm_unavailable = "skip"
