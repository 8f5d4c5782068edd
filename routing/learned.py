"""The routing process's link state: one engine, and the routing table it keeps learned.

Built from the node file's ``[linkstate]`` table (keys, certificate, CA,
timers) and its neighbourhood (this node's links and SAEs). The relay drives
it over the internal Routing RPCs (routing.service); every change to the
database is turned into a new graph for :class:`routing.graph.RoutingTable`
at once, so the forwarding table pushed to the relay and the 014 gateway
follows link state within the call that changed it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

from kme.config import ConfigError, NodeConfig, QkdLink
from kme.types import NodeId
from routing.engine import LinkStateEngine, Sends
from routing.graph import RoutingTable
from routing.lsdb import Database, learned_graph
from routing.origin import DeviceReading, LocalLink, Originator
from routing.records import ForeignNode, Signed, Verifier, load_signer, load_trust

__all__ = ["LearnedRouting", "build_engine"]


def build_engine(config: NodeConfig, log: logging.Logger) -> LinkStateEngine:
    """The node's link-state engine; ConfigError naming the field if a file is unusable."""
    settings = config.linkstate
    if settings is None:
        raise ConfigError(config.source, "linkstate", "is required for link state")
    me = config.node_id
    try:
        signer = load_signer(settings.key, settings.cert)
    except ValueError as exc:
        raise ConfigError(config.source, "linkstate.key", str(exc)) from None
    if signer.node != me:
        raise ConfigError(config.source, "linkstate.cert",
                          f"certificate CN is {signer.node!r}, this node is {me!r}")
    try:
        trust = load_trust(settings.ca)
    except ValueError as exc:
        raise ConfigError(config.source, "linkstate.ca", f"not a PEM certificate: {exc}") from None
    topology = config.topology
    links = []
    for link in topology.links_of(me):
        other = link.other(me)
        links.append(LocalLink(
            link.id, other, link.kind, link.cost,
            link.secret_key_rate if isinstance(link, QkdLink) else 0.0,
            foreign=topology.kmstns[other].kind == "foreign"))
    foreign = tuple(ForeignNode(link.neighbour, topology.saes_of(link.neighbour))
                    for link in links if link.foreign)
    originator = Originator(me, topology.name, topology.saes_of(me), tuple(links), settings,
                            foreign)
    db = Database(me, Verifier(trust, topology.name), log)
    return LinkStateEngine(db, originator, signer, log)


class LearnedRouting:
    """Link state in the routing process: the engine, the table, sends waiting for the relay."""

    def __init__(self, engine: LinkStateEngine, table: RoutingTable,
                 log: logging.Logger) -> None:
        self.engine = engine
        self._table = table
        self._log = log
        self._pending = Sends()
        self._lock = threading.Lock()
        self._relearn_lock = threading.Lock()
        engine.set_on_change(self._relearn)
        self._relearn()

    @property
    def db(self) -> Database:
        return self.engine.db

    def _relearn(self) -> None:
        with self._relearn_lock:
            if self._table.learn(*learned_graph(self.engine.db)):
                self._log.info("routes follow link state", extra={
                    "topology_version": self._table.version,
                    "digest": self.engine.digest})

    def _with_pending(self, sends: Sends) -> Sends:
        with self._lock:
            pending, self._pending = self._pending, Sends()
        pending.merge(sends)
        return pending

    def submit(self, from_node: NodeId, records: Iterable[Signed]) -> Sends:
        return self._with_pending(self.engine.submit(from_node, records))

    def report(self, neighbours_up: Mapping[NodeId, bool],
               devices: Mapping[str, DeviceReading]) -> Sends:
        return self._with_pending(self.engine.report(neighbours_up, devices))

    def override(self, link_id: str, up: bool, cost: float | None) -> bool:
        """An operator's change; True if the link is this node's (a new record floods
        with the relay's next call)."""
        sends = self.engine.override(link_id, up, cost)
        with self._lock:
            self._pending.merge(sends)
        return any(link.link_id == link_id for link in self.engine.originator.links)

    def sync(self, from_node: NodeId, theirs: Mapping[str, int]
             ) -> tuple[list[Signed], dict[NodeId, int]]:
        return self.engine.sync(from_node, theirs)
