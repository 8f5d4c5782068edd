"""A routing replica for hot paths: routes computed in-process, kept current by a stream.

The gateways' flows ask for a route on every key request and every hop. A
gRPC call costs about a millisecond on a small machine, so instead the flows
hold a :class:`RoutingReplica`: the same pure RoutingTable as the routing
service, fed by ``Routing.Watch``, which pushes the link state every time it
changes. A route is then a cached Dijkstra walk in this process. The routing
service stays the single source of link state (``kmstn link`` changes it
there); a change reaches every replica as soon as it is pushed.

If the stream is down (the routing service restarts) the replica does not
guess: until a snapshot arrives again, routes are asked of the service over
RPC, exactly as without a replica (the call waits, within its deadline, for
the restarted service). The stream is opened again within half a second.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from kme.config import Topology
from kme.rpc.v1 import routing_pb2, routing_pb2_grpc
from kme.types import NodeId
from routing.client import RoutingClient
from routing.graph import Route, RoutingTable

__all__ = ["RoutingReplica"]


class RoutingReplica:
    def __init__(self, topology: Topology, node: NodeId, channel: grpc.Channel,
                 log: logging.Logger | None = None, heartbeat_s: int = 15) -> None:
        self._table = RoutingTable(topology, node)
        self._client = RoutingClient(channel)
        self._stub = routing_pb2_grpc.RoutingStub(channel)
        self._log = log or logging.getLogger("kmstn.routing.replica")
        self._heartbeat = heartbeat_s
        self._synced = threading.Event()
        self._stopped = threading.Event()
        self._call: Any = None  # the running Watch call, cancelled by close()
        self._thread = threading.Thread(target=self._follow, name="routing-replica",
                                        daemon=True)
        self._thread.start()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def route_to_node(self, node: str) -> Route:
        if self._synced.is_set():
            return self._table.route_to_node(node)
        return self._client.route_to_node(node)

    def route_to_sae(self, sae: str) -> Route:
        if self._synced.is_set():
            return self._table.route_to_sae(sae)
        return self._client.route_to_sae(sae)

    def close(self) -> None:
        self._stopped.set()
        call = self._call
        if call is not None:
            call.cancel()

    def _follow(self) -> None:
        backoff = 0.1
        while not self._stopped.is_set():
            try:
                stream = self._stub.Watch(
                    routing_pb2.WatchRequest(heartbeat_seconds=self._heartbeat),
                    timeout=None)
                self._call = stream
                for snapshot in stream:
                    self._apply(snapshot)
                    backoff = 0.1
            except grpc.RpcError as err:
                if self._stopped.is_set():
                    return
                self._log.debug("routing stream interrupted", extra={"error": str(err.code())})
            self._synced.clear()
            self._stopped.wait(backoff)
            backoff = min(0.5, backoff * 2)

    def _apply(self, snapshot: routing_pb2.TopologySnapshot) -> None:
        states = {ls.link_id: (ls.up, ls.cost) for ls in snapshot.links}
        if self._table.version != snapshot.version or not self._synced.is_set():
            self._table.replace_state(snapshot.version, states)
        self._synced.set()
