"""The addresses of a private LAN, shared by the root bridge (:mod:`.bridge`) and the
unprivileged switch (:mod:`.userlan`): the subnet a user names and the next free guest address.

Guests get the hosts of the subnet from the second one on (``.2``, ``.3``, ...); the first is
left for a gateway-like role neither LAN takes. Freed addresses are reused lowest-first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

from ...errors import BackendError, ConfigError

__all__ = ["free_address", "subnet"]


def subnet(cidr: str) -> ipaddress.IPv4Network:
    """``cidr`` as an IPv4 subnet of at least 4 addresses, else a ConfigError saying how."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise ConfigError(
            f"network {cidr!r} is not a valid subnet ({exc}); write it like '10.77.0.0/24'"
        ) from None
    if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
        raise ConfigError(
            f"network {cidr!r} must be an IPv4 subnet of at least 4 addresses "
            "(prefix /30 or shorter), e.g. '10.77.0.0/24'"
        )
    return network


def free_address(
    network: ipaddress.IPv4Network, used: Collection[ipaddress.IPv4Address]
) -> ipaddress.IPv4Address:
    """The lowest host address of ``network`` after the first that is not in ``used``."""
    hosts = network.hosts()
    next(hosts)
    for address in hosts:
        if address not in used:
            return address
    raise BackendError(
        f"the private network {network} has no free address left for another machine; "
        "use a larger subnet"
    )
