"""The parts a libvirt backend is made of, built once from its options.

:class:`Parts` holds one of each, wired together: the connection (:mod:`.connection`), the
accelerator (:mod:`.accel`), the command channels (:mod:`.channels`), the guests
(:mod:`.guests`), the disk pool and the domain XML (:mod:`.domains`), the environment
networks (:mod:`.network`), the template records (:mod:`.records`) and the inventory
(:mod:`.inventory`). :mod:`.templates`, :mod:`.machines` and :mod:`.snapshots` act on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .accel import Accelerator
from .channels import Channels
from .config import LibvirtConfig, Paths
from .connection import Hypervisor
from .domains import Pool
from .guests import Guests
from .inventory import Inventory
from .network import Networks
from .records import Records

__all__ = ["Parts"]


@dataclass(frozen=True)
class Parts:
    """One backend's collaborators (see the module docstring); each is thread-safe."""

    config: LibvirtConfig
    paths: Paths
    hv: Hypervisor
    accel: Accelerator
    channels: Channels
    guests: Guests
    pool: Pool
    networks: Networks
    records: Records
    inventory: Inventory

    @classmethod
    def of(cls, config: LibvirtConfig) -> Parts:
        """The parts for ``config``: nothing is connected, nothing is written yet."""
        paths = Paths(config.state_dir)
        hv = Hypervisor(config.uris)
        accel = Accelerator(config.accel, hv, paths)
        channels = Channels(hv, paths)
        return cls(
            config=config,
            paths=paths,
            hv=hv,
            accel=accel,
            channels=channels,
            guests=Guests(hv, paths, channels, accel, config.domain_xml),
            pool=Pool(hv, paths),
            networks=Networks(hv, paths),
            records=Records(paths),
            inventory=Inventory(hv, config.uris, paths),
        )
