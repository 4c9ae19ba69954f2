"""libvirt backend."""

from .backend import LibvirtBackend

__all__ = ["LibvirtBackend"]
