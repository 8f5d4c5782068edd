"""``python -m routing --config node.toml``: the routing service process.

With a ``[linkstate]`` table in the node file, the graph is learned from
signed link-state records (routing.learned), which this node's relay hands
in; without it, it is the configured topology.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

from kme import metrics
from kme.rpc.v1 import routing_pb2, routing_pb2_grpc
from kme.server import Runtime, run_service
from routing.graph import RoutingTable
from routing.learned import LearnedRouting, build_engine
from routing.service import RoutingService


def build(rt: Runtime) -> None:
    table = RoutingTable(rt.config.topology, rt.config.node_id)
    learned = None
    if rt.config.linkstate is not None:
        learned = LearnedRouting(build_engine(rt.config, rt.log), table, rt.log)
        # Until its neighbours have been heard and synced with (hellos, then a
        # header swap), what this node does not know may exist: UNAVAILABLE
        # with Retry-After, not "unknown SAE", for that long.
        ls = rt.config.linkstate
        table.set_learning(True)
        settle = threading.Timer((2 * ls.hello_interval_ms + ls.dead_interval_ms) / 1000,
                                 table.set_learning, args=(False,))
        settle.daemon = True
        rt.on_start(settle.start)
        rt.on_stop(settle.cancel)
    routing_pb2_grpc.add_RoutingServicer_to_server(RoutingService(table, rt.log, learned),
                                                   rt.server)
    # Link state is read from the table when scraped, whoever changed it.
    metrics.register_link_state(lambda: [
        metrics.LinkView(s.link.id, s.link.kind, s.link.a, s.link.b, s.up, s.cost)
        for s in table.links()[1]], rt.log)
    rt.serving(routing_pb2.DESCRIPTOR.services_by_name["Routing"].full_name)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("routing", "kmstn routing service (shortest paths, link state)", build,
                       argv)


if __name__ == "__main__":
    sys.exit(main())
