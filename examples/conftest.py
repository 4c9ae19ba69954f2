"""Run as a normal user, the examples are skipped with what to do, instead of erroring.

Every example asks for ``image="host"`` (a read-only view of this machine's own ``/``), which
only root can make. As non-root, ``--vm-unavailable`` therefore defaults to ``skip`` here:
each test is skipped with the plugin's reason (listed by ``-rs`` in pytest.ini): run as root,
or give ``image=`` a rootfs directory or tarball. An explicit ``--vm-unavailable``,
``VMENV_UNAVAILABLE`` or ``vmenv_unavailable`` still wins; as root nothing changes.
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
