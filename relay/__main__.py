"""``python -m relay --config node.toml``: the relay service process.

Two listeners: the internal ``kme.rpc.v1.Relay`` service on the node's relay
endpoint (a unix socket by default), for the node's own gateway and flows;
and the neighbour-facing ``kme.rpc.v1.RelayPeer`` service on TCP
``host:relay_port`` from the topology, with mutual TLS using the node
certificate, for the ML-KEM-768 exchange with adjacent relays.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kme import metrics
from kme.config import NodeConfig
from kme.qkd import QkdDevices
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.server import Runtime, run_service
from relay.forward import Forwarder
from relay.hopkey import HopLinks
from relay.kem import SessionStore
from relay.qkdreserve import ReservedQkdKeys
from relay.service import Opener, PeerPools, RelayPeerService, RelayService, Sealer


def qkd_devices(config: NodeConfig) -> QkdDevices | None:
    """This node's QKD device clients (ETSI 014), or None when it ends no QKD link."""
    return QkdDevices(config) if config.qkd_devices else None


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

    forwarder = Forwarder(config, sealer.seal, rt.log, discard_sessions=sealer.discard_keys)
    relay_pb2_grpc.add_RelayServicer_to_server(RelayService(sealer, opener, forwarder),
                                               rt.server)
    peer_server = rt.add_tcp_server(config.node.host, config.node.relay_port, config.tls)
    relay_pb2_grpc.add_RelayPeerServicer_to_server(
        RelayPeerService(links, sessions, rt.log, reserved, devices), peer_server)
    for name in ("Relay", "RelayPeer"):
        rt.serving(relay_pb2.DESCRIPTOR.services_by_name[name].full_name)
    rt.on_stop(pools.close)
    rt.on_stop(forwarder.close)
    if devices is not None:
        rt.on_stop(devices.close)
        # Device pool level and measured key rate per QKD link, for the metrics.
        poller = metrics.DevicePoller([devices.for_link(lid) for lid in devices.links],
                                      config.metrics.device_poll_s, rt.log)
        poller.start()
        rt.on_stop(poller.stop)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("relay", "kmstn relay service (ML-KEM-768 x QKD hop protection)", build,
                       argv)


if __name__ == "__main__":
    sys.exit(main())
