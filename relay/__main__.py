"""``python -m relay --config node.toml``: the relay service process.

The relay owns every hop of this node. Two listeners: the internal
``kme.rpc.v1.Relay`` service on the node's relay endpoint (a unix socket by
default), which the node's two gateways call once per request; and the
neighbour-facing ``kme.rpc.v1.RelayPeer`` service on TCP ``host:relay_port``
from the topology, with mutual TLS using the node certificate, for the
ML-KEM-768 exchange with adjacent relays, and, on a node with signed link
state, hellos, flooding and syncs of link-state records (relay/linkstate.py),
which it hands to the node's routing service. The key negotiation
(kme.flows) runs here, over the keyvault, routing, the QKD devices and the
neighbours' 020 listeners.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from keyvault.client import KeyVaultClient
from kme import metrics
from kme.channels import internal_channel
from kme.config import NodeConfig
from kme.devicepoll import DevicePoller
from kme.flows import Flows
from kme.qkd import QkdDevices
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.server import Runtime, run_service
from relay.hop import Opener, PeerPools, Sealer
from relay.hopkey import HopLinks
from relay.kem import SessionStore
from relay.linkstate import LinkStateAgent, LinkStatePeerClient
from relay.peer import RelayPeerService, peer_channel
from relay.ports import FlowDevices, VaultPort
from relay.qkdreserve import ReservedQkdKeys
from relay.service import RelayService
from relay.transport import Transport
from routing.client import RoutingClient
from routing.follower import TableFollower


def qkd_devices(config: NodeConfig) -> QkdDevices | None:
    """This node's QKD device clients (ETSI 014), or None when it ends no QKD link."""
    return QkdDevices(config) if config.qkd_devices else None


def workers(config: NodeConfig) -> int:
    """gRPC threads: every 014 and 020 listener thread may wait here at once.

    A request that waits for a neighbour holds its thread; with fewer threads
    than the two gateways can send, requests from one side could wait for
    threads held by requests waiting on the other side's relay.
    """
    g = config.gateway
    return g.threads * (g.workers + 1) + 16


def build(rt: Runtime) -> None:
    config = rt.config
    links = HopLinks(config)
    devices = qkd_devices(config)
    sessions = SessionStore(config.relay.session_ttl_s,
                            max_per_peer=max(64, 4 * config.relay.kem_pool_size), log=rt.log)
    reserved = ReservedQkdKeys(config.relay.session_ttl_s,
                               max_per_peer=max(32, 4 * config.relay.qkd_reserve))
    pools = PeerPools(config, links, rt.log, devices=devices)
    sealer = Sealer(links, pools, devices, rt.log)
    opener = Opener(links, sessions, devices, rt.log, reserved)
    transport = Transport(config, sealer.seal_detailed, rt.log,
                          discard_sessions=sealer.discard_keys)
    budget = config.gateway.relay_timeout_ms / 1000
    vault = VaultPort(KeyVaultClient(internal_channel(config, "keyvault"), timeout=budget))
    routes = TableFollower(internal_channel(config, "routing"), rt.log)
    flow_devices = FlowDevices(devices or QkdDevices(config), pools, reserved)
    flows = Flows(config, routes, vault, transport, flow_devices, vault, rt.log,
                  workers=max(8, config.gateway.threads), stock_vault=vault,
                  taken_bits=metrics.device_bits_taken)
    kmstn_peers = {str(p) for p in links.neighbours}
    relay_pb2_grpc.add_RelayServicer_to_server(
        RelayService(flows, sealer, opener, kmstn_peers, budget, rt.log), rt.server)
    peer_server = rt.add_tcp_server(config.node.host, config.node.relay_port, config.tls)
    peer_service = RelayPeerService(links, sessions, rt.log, reserved, devices)
    relay_pb2_grpc.add_RelayPeerServicer_to_server(peer_service, peer_server)
    for name in ("Relay", "RelayPeer"):
        rt.serving(relay_pb2.DESCRIPTOR.services_by_name[name].full_name)
    rt.on_start(flows.start)
    rt.on_stop(pools.close)
    rt.on_stop(transport.close)
    rt.on_stop(flows.close)
    rt.on_stop(routes.close)
    poller = None
    if devices is not None:
        rt.on_stop(devices.close)
        # Device pool level and measured key rate per QKD link, for the metrics
        # and, with link state, for each QKD link's state and cost.
        poll_s = config.metrics.device_poll_s
        if config.linkstate is not None:
            own = config.linkstate.device_poll_ms / 1000
            poll_s = min(poll_s, own) if poll_s > 0 else own
        poller = DevicePoller([devices.for_link(lid) for lid in devices.links],
                              poll_s, rt.log)
        poller.start()
        rt.on_stop(poller.stop)
    if config.linkstate is not None:
        agent = link_state_agent(config, rt, poller)
        peer_service.attach_linkstate(agent)
        rt.on_start(agent.start)
        rt.on_stop(agent.stop)


def link_state_agent(config: NodeConfig, rt: Runtime,
                     poller: DevicePoller | None) -> LinkStateAgent:
    """Hellos, flooding and syncs with the kmstn neighbours, for the routing service."""
    settings = config.linkstate
    assert settings is not None  # noqa: S101 - only called with link state
    timeout = max(1.0, settings.hello_interval_ms / 1000)
    return LinkStateAgent(
        config, RoutingClient(internal_channel(config, "routing"), timeout=2.0),
        lambda peer: LinkStatePeerClient(peer_channel(config, peer), timeout),
        sorted(HopLinks(config).neighbours),
        poller.observations if poller is not None else dict, rt.log)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("relay", "kmstn relay service (the hop: ML-KEM-768 x QKD, ETSI 020)",
                       build, argv, max_workers=workers)


if __name__ == "__main__":
    sys.exit(main())
