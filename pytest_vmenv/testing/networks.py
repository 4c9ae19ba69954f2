"""NetworkTests: machines on one ``network`` reach each other by name and IP; others do not.

Run where ``capabilities().network`` is True. The orchestrator hands ``clone`` a
:class:`~pytest_vmenv.backend.Network` per environment instance; the tests make two instances
of one name, as two tests that both ask for ``network="lan"`` get.
"""

from __future__ import annotations

import secrets

from ..backend import Capabilities, Network
from ..machine import Machine
from .fixtures import MachineMaker, require

__all__ = ["NetworkTests"]

PORT = 7777
GREETING = "hello-from-server"


def _serve(server: Machine, netcat: str) -> None:
    """A greeting on ``PORT`` for every connection, in the background while the machine runs."""
    loop = f"while true; do echo {GREETING} | {netcat} -l -p {PORT}; done"
    server.succeed(f"({loop}) >/dev/null 2>&1 </dev/null &")


def _dial(netcat: str, target: str) -> str:
    return f"{netcat} -w 2 {target} {PORT} </dev/null"


class NetworkTests:
    """``spec.network``: one segment per network id, names resolved on it, nothing across."""

    def test_machines_on_one_network_reach_each_other(
        self, machines: MachineMaker, capabilities: Capabilities, netcat: str
    ) -> None:
        require(capabilities.network, "capabilities().network is False: spec.network is ignored")
        lan, elsewhere = (Network("lan", secrets.token_hex(3)) for _ in range(2))
        client = machines("client", network=lan)
        server = machines("server", network=lan)
        stranger = machines("stranger", network=elsewhere)
        assert client.ip and server.ip and client.ip != server.ip
        _serve(server, netcat)
        for target in ("server", server.ip):
            out = client.wait_until_succeeds(_dial(netcat, target), timeout=30)
            assert GREETING in out, target
        targets = ["server"] + ([server.ip] if stranger.ip != server.ip else [])
        for target in targets:
            result = stranger.run(_dial(netcat, target), timeout=30)
            assert result.exit_code != 0 and GREETING not in result.stdout, target
        out = client.wait_until_succeeds(_dial(netcat, "server"), timeout=30)
        assert GREETING in out, "the server stopped answering its own network"
