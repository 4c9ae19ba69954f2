"""pytest-vmenv's vSphere backend: linked clones from template snapshots, through pyvmomi.

Registered as ``vsphere`` in the ``pytest_vmenv.backends`` entry-point group; see
:mod:`.backend` for what it does and :mod:`.config` for its settings.
"""

from .backend import VsphereBackend
from .config import Secret, VsphereConfig

__all__ = ["Secret", "VsphereBackend", "VsphereConfig"]
