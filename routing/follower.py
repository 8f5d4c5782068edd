"""Routes for hot paths from the forwarding table the routing service pushes.

The flows (and the relay) ask for a route on every key request and every
hop. A gRPC call costs about a millisecond on a small machine, and holding
the graph would put scipy in every process (+36 MB each), so instead they
hold a :class:`TableFollower`: it keeps the latest
:class:`routing.table.ForwardingTable` from ``Routing.WatchTable``, which the
routing service sends at once, again on every link change and at least every
heartbeat. A route is then a dict lookup in this process. The routing
service stays the single source of link state (``kmstn link`` changes it
there); a change reaches every follower as soon as the new table is pushed.

If the stream is down (the routing service restarts), or has been silent
for longer than two heartbeats (a hung service), the follower does not
guess: until a table arrives again, routes are asked of the service over RPC,
exactly as without a follower (the call waits, within its deadline, for the
restarted service). The stream is opened again within half a second.

Imports neither scipy nor numpy (an import test checks it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc

from kme.rpc.v1 import routing_pb2, routing_pb2_grpc
from kme.types import NodeId, SaeId
from routing.client import RoutingClient
from routing.convert import table_from_proto
from routing.table import ForwardingTable, Route

__all__ = ["TableFollower"]


class TableFollower:
    """The latest forwarding table of this node's routing service, kept by a stream.

    ``channel`` is a channel to the node's routing service; ``heartbeat_s`` is
    asked of the service as the longest quiet time between two tables;
    ``rpc_timeout`` is the deadline of a route asked over RPC while out of
    sync. Route answers (``route_to_node``, ``route_to_sae``, ``node_of_sae``)
    and their KmstnErrors are those of the Route RPC, in sync or not.
    """

    def __init__(self, channel: grpc.Channel, log: logging.Logger | None = None,
                 heartbeat_s: int = 15, rpc_timeout: float = 2.0) -> None:
        self._client = RoutingClient(channel, timeout=rpc_timeout)
        self._stub = routing_pb2_grpc.RoutingStub(channel)
        self._log = log or logging.getLogger("kmstn.routing.follower")
        self._heartbeat = heartbeat_s
        # A stream that sent nothing for this long is taken for dead: the
        # service sends a table at least every heartbeat.
        self._silence = 2.0 * heartbeat_s + 1.0
        self._table: ForwardingTable | None = None
        self._received = 0.0  # time.monotonic() of the last table received
        self._synced = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None  # the running WatchTable call, cancelled by close()
        self._thread = threading.Thread(target=self._follow, name="routing-follower",
                                        daemon=True)
        self._thread.start()

    # -- state -----------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True while routes are answered from a table the stream keeps current."""
        return self._current() is not None

    @property
    def version(self) -> int:
        """The topology version of the latest table received (0 before the first)."""
        table = self._table
        return table.version if table is not None else 0

    @property
    def table(self) -> ForwardingTable | None:
        """The current table while synced, else None (then routes come over RPC)."""
        return self._current()

    def wait_synced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a table; True once one is in hand."""
        return self._synced.wait(timeout)

    def close(self) -> None:
        """Stop following; routes are asked over RPC from then on (while the channel is open)."""
        with self._lock:
            self._stopped.set()
            self._synced.clear()
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=2.0)

    # -- routes ----------------------------------------------------------------

    def route_to_node(self, node: str) -> Route:
        table = self._current()
        if table is not None:
            return table.route_to_node(node)
        return self._client.route_to_node(node)

    def route_to_sae(self, sae: str) -> Route:
        table = self._current()
        if table is not None:
            return table.route_to_sae(sae)
        return self._client.route_to_sae(sae)

    def node_of_sae(self, sae: str) -> NodeId:
        table = self._current()
        if table is not None:
            return table.node_of_sae(sae)
        # Out of sync: the service's own map, not a stale copy. The Route RPC
        # would fail when the node is known but cut off, so ask for the topology.
        saes = {SaeId(s.sae_id): NodeId(s.node_id) for s in self._client.topology().saes}
        try:
            return saes[SaeId(sae)]
        except KeyError:
            pass
        # Not in the snapshot: the service says why (unknown, or not known yet
        # while it is still learning link state), or knows it by now.
        return self._client.route_to_sae(sae).destination

    def known_saes(self) -> dict[SaeId, NodeId]:
        """Every SAE the routes know (configured, or learned from link state) and its node."""
        table = self._current()
        if table is not None:
            return dict(table.saes)
        return {SaeId(s.sae_id): NodeId(s.node_id) for s in self._client.topology().saes}

    # -- the stream ------------------------------------------------------------

    def _current(self) -> ForwardingTable | None:
        if not self._synced.is_set():
            return None
        if time.monotonic() - self._received > self._silence:
            # The service stopped talking without closing the stream: stop
            # trusting the table and make the stream be opened again.
            self._drop("routing stream silent")
            return None
        return self._table

    def _drop(self, why: str) -> None:
        if self._synced.is_set():
            self._synced.clear()
            self._log.warning(why, extra={"topology_version": self.version})
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def _follow(self) -> None:
        try:
            self._run()
        finally:
            self._synced.clear()  # closed: no table goes stale in hand

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopped.is_set():
            try:
                with self._lock:
                    if self._stopped.is_set():
                        return
                    stream = self._stub.WatchTable(
                        routing_pb2.WatchRequest(heartbeat_seconds=self._heartbeat),
                        timeout=None)
                    self._call = stream
                for msg in stream:
                    self._apply(msg)
                    backoff = 0.1
            except grpc.RpcError as err:
                if self._stopped.is_set():
                    return
                self._log.debug("routing stream interrupted", extra={"error": str(err.code())})
            except Exception:
                # Never let the follower die: out of sync, routes go over RPC
                # and the stream is opened again.
                self._log.exception("routing stream failed")
            self._synced.clear()
            self._stopped.wait(backoff)
            backoff = min(0.5, backoff * 2)

    def _apply(self, msg: routing_pb2.ForwardingTable) -> None:
        current = self._table
        if current is None or current.version != msg.version or not self._synced.is_set():
            try:
                table = table_from_proto(msg)
            except ValueError as exc:
                # A table that is not one tree of paths is a bug in the service:
                # answer over RPC rather than from it.
                self._log.error("forwarding table refused", extra={"error": str(exc)})
                self._synced.clear()
                return
            self._table = table
        self._received = time.monotonic()
        self._synced.set()
