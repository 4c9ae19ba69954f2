"""pytest-vmenv: declarative test machines for pytest.

Declare what a test needs with ``@pytest.mark.vm(...)`` or ``@pytest.mark.vmenv("NAME")``;
the plugin hands real, isolated machines to the test through the ``vm``/``vms`` fixtures and
destroys them afterwards.
"""

from .backend import (
    GET_LIMIT,
    OUTPUT_LIMIT,
    Backend,
    Capabilities,
    MachineRef,
    Result,
    Session,
    Snapshot,
)
from .errors import (
    BackendError,
    BackendUnavailable,
    BootTimeout,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    FileTooLarge,
    MachineGone,
    ProvisionError,
    TemplateInUse,
    VmenvError,
)
from .machine import Machine
from .spec import MachineSpec

__all__ = [
    "GET_LIMIT",
    "OUTPUT_LIMIT",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "BootTimeout",
    "Capabilities",
    "CommandFailed",
    "CommandTimeout",
    "ConfigError",
    "FileTooLarge",
    "Machine",
    "MachineGone",
    "MachineRef",
    "MachineSpec",
    "ProvisionError",
    "Result",
    "Session",
    "Snapshot",
    "TemplateInUse",
    "VmenvError",
]
__version__ = "0.1.0"
