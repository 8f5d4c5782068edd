"""The relay's half of link state: the node-to-node channel for hellos, records and syncs.

The relay already holds the authenticated channel to every kmstn neighbour
(RelayPeer gRPC, mutual TLS with node certificates; the caller is the CN of
its verified certificate). :class:`LinkStateAgent` uses it for link state,
and hands everything it receives to this node's routing service, which
verifies, keeps and decides (routing.learned); the relay never judges a
record itself. Every hello interval it

1. says hello to each kmstn neighbour (RelayPeer.Hello, carrying the
   database digest), and marks who answered (routing.adjacency);
2. reports to routing who is up and what each QKD device said at its last
   poll (Routing.ReportLocalState); routing may sign a new record of this node;
3. sends what routing says to send (FloodInstructions), and syncs with any
   neighbour whose database stayed different, or that just came up.

Records a neighbour floods (RelayPeer.Flood) go to routing at once
(Routing.SubmitLinkState), and what routing passes on is sent from a small
pool, so a neighbour's call returns without waiting for the next hop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from kme.channels import call
from kme.config import NodeConfig
from kme.devicepoll import DeviceObservation
from kme.errors import KmstnError
from kme.rpc.v1 import linkstate_pb2, relay_pb2, relay_pb2_grpc, routing_pb2
from kme.types import NodeId
from routing.adjacency import Adjacencies
from routing.client import RoutingClient

__all__ = ["LinkStateAgent", "LinkStatePeerClient"]


class LinkStatePeerClient:
    """A neighbour's RelayPeer, for link state (calls fail at once when it is away)."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self._stub = relay_pb2_grpc.RelayPeerStub(channel)
        self._timeout = timeout

    def hello(self, digest: str) -> str:
        resp = call(self._stub.Hello, relay_pb2.HelloRequest(digest=digest), self._timeout,
                    wait_for_ready=False)
        return str(resp.digest)

    def flood(self, records: Sequence[linkstate_pb2.SignedLinkState]) -> None:
        call(self._stub.Flood, relay_pb2.FloodRequest(records=records), self._timeout,
             wait_for_ready=False)

    def sync(self, headers: Sequence[linkstate_pb2.LinkStateHeader]
             ) -> relay_pb2.SyncLinkStateResponse:
        return call(self._stub.SyncLinkState, relay_pb2.SyncLinkStateRequest(headers=headers),
                    self._timeout, wait_for_ready=False)


class LinkStateAgent:
    def __init__(self, config: NodeConfig, routing: RoutingClient,
                 peers: Callable[[NodeId], LinkStatePeerClient],
                 neighbours: Sequence[NodeId],
                 devices: Callable[[], dict[str, DeviceObservation]],
                 log: logging.Logger) -> None:
        settings = config.linkstate
        if settings is None:
            raise ValueError("link state is not configured")
        self._me = config.node_id
        self._routing = routing
        self._peer_factory = peers
        self._peers: dict[NodeId, LinkStatePeerClient] = {}
        self._neighbours = tuple(neighbours)
        self._devices = devices
        self._log = log
        self._interval = settings.hello_interval_ms / 1000
        self._adj = Adjacencies(self._neighbours, settings.dead_interval_ms)
        self._digest = ""
        self._outstanding: set[NodeId] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._routing_down = False
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self._neighbours)),
                                        thread_name_prefix="linkstate")
        self._thread = threading.Thread(target=self._run, name="linkstate", daemon=True)
        self._was_up: dict[NodeId, bool] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _now_ms(self) -> int:
        return int(time.monotonic() * 1000)

    def _peer(self, node: NodeId) -> LinkStatePeerClient:
        with self._lock:
            peer = self._peers.get(node)
            if peer is None:
                peer = self._peers[node] = self._peer_factory(node)
            return peer

    # -- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._tick()
            except Exception:
                self._log.exception("link-state tick failed")
            self._stop.wait(max(0.0, self._interval - (time.monotonic() - started)))

    def _tick(self) -> None:
        for n in self._neighbours:
            with self._lock:
                if n in self._outstanding:
                    continue
                self._outstanding.add(n)
            self._pool.submit(self._hello, n)
        states = self._adj.states(self._now_ms())
        for n, up in states.items():
            if self._was_up.get(n) != up:
                self._log.info("neighbour " + ("up" if up else "down"), extra={"peer": n})
                self._was_up[n] = up
        state = routing_pb2.LocalState(
            neighbours=[routing_pb2.LocalState.Neighbour(node_id=n, up=up)
                        for n, up in states.items()],
            devices=[routing_pb2.LocalState.Device(
                link_id=link, reachable=o.reachable,
                rate_bps=o.rate_bps if o.rate_bps is not None else -1.0,
                stored_keys=o.stored_keys, max_keys=o.max_keys)
                for link, o in self._devices().items()])
        try:
            instructions = self._routing.report_local_state(state)
        except KmstnError as exc:
            if not self._routing_down:
                self._log.warning("routing service unreachable for link state",
                                  extra={"error": exc.public})
                self._routing_down = True
            return
        self._routing_down = False
        self._dispatch(instructions)
        for n in self._neighbours:
            if self._adj.take_sync(n):
                self._pool.submit(self._sync, n)

    def _hello(self, peer: NodeId) -> None:
        try:
            theirs = self._peer(peer).hello(self._digest)
            self._adj.heard(peer, self._digest, theirs, self._now_ms())
        except KmstnError:
            pass  # silent: the dead interval decides
        finally:
            with self._lock:
                self._outstanding.discard(peer)

    def _dispatch(self, instructions: routing_pb2.FloodInstructions) -> None:
        if instructions.digest:
            self._digest = instructions.digest
        for send in instructions.sends:
            if send.records:
                self._pool.submit(self._flood_to, NodeId(send.to_node_id), list(send.records))

    def _flood_to(self, peer: NodeId, records: list[linkstate_pb2.SignedLinkState]) -> None:
        try:
            self._peer(peer).flood(records)
        except KmstnError as exc:
            # A neighbour that cannot be reached now is synced when it is back.
            self._log.debug("link-state flood failed", extra={"peer": peer,
                                                              "error": exc.public})

    def _sync(self, peer: NodeId) -> None:
        """Swap headers with ``peer``; take what it has that we lack, send what it lacks."""
        try:
            ours = self._routing.link_state_sync(self._me, [], headers_only=True).headers
            answer = self._peer(peer).sync(list(ours))
            if answer.records:
                self._dispatch(self._routing.submit_link_state(peer, list(answer.records)))
            theirs = self._routing.link_state_sync(peer, list(answer.headers))
            if theirs.records:
                self._peer(peer).flood(list(theirs.records))
            self._log.debug("link state synced", extra={
                "peer": peer, "received": len(answer.records), "sent": len(theirs.records)})
        except KmstnError as exc:
            self._log.debug("link-state sync failed", extra={"peer": peer, "error": exc.public})

    # -- what neighbours call (RelayPeer) -------------------------------------------

    def on_hello(self, peer: NodeId, theirs: str) -> str:
        self._adj.heard(peer, self._digest, theirs, self._now_ms())
        return self._digest

    def on_flood(self, peer: NodeId, records: Sequence[linkstate_pb2.SignedLinkState]) -> None:
        self._dispatch(self._routing.submit_link_state(peer, records))

    def on_sync(self, peer: NodeId, headers: Sequence[linkstate_pb2.LinkStateHeader]
                ) -> relay_pb2.SyncLinkStateResponse:
        got = self._routing.link_state_sync(peer, headers)
        return relay_pb2.SyncLinkStateResponse(records=got.records, headers=got.headers)
