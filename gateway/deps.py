"""What one gateway process needs of the node's services, built after Gunicorn's fork.

The gateways are edges: the 020 listener needs only the relay; the 014
listener needs the relay (Get key, Get status), the keyvault (Get key with
key IDs takes straight from it) and the routes (to compute a request's
limits before parsing it). gRPC channels do not survive a fork, so all of it
is built inside the serving process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyvault.client import KeyVaultClient
from kme.channels import internal_channel
from kme.config import NodeConfig
from relay.client import RelayClient
from routing.follower import TableFollower

if TYPE_CHECKING:
    from kme.flows import Routes

__all__ = ["Edge", "build_edge"]


@dataclass(frozen=True)
class Edge:
    config: NodeConfig
    relay: RelayClient
    vault: KeyVaultClient | None = None
    routes: Routes | None = None


def build_edge(config: NodeConfig, api: str) -> Edge:
    relay = RelayClient(internal_channel(config, "relay"),
                        timeout=config.gateway.relay_timeout_ms / 1000)
    if api == "etsi020":
        return Edge(config, relay)
    wait = config.gateway.inflight_wait_ms / 1000
    return Edge(
        config,
        relay,
        KeyVaultClient(internal_channel(config, "keyvault"), timeout=5.0 + wait),
        # Routes are read in-process from the forwarding table that the
        # routing service keeps current over a stream (no RPC per route).
        TableFollower(internal_channel(config, "routing")),
    )
