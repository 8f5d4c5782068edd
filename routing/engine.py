"""One node's link-state protocol, transport-free: what to keep, what to sign, what to send.

:class:`LinkStateEngine` joins the database (routing.lsdb), this node's own
record (routing.origin) and its signer. It is driven from outside and
answers with :class:`Sends` (which records go to which neighbour); it never
sends anything itself. The routing process drives it from the relay's calls
(Routing.SubmitLinkState, ReportLocalState, LinkStateSync): the relay is the
node-to-node channel. The simulator (routing.simulate) drives the very same
class with a simulated transport, a thousand of them in one process.

Rules (the usual ones of link-state routing, with signatures):

* A record from a neighbour is verified and installed if newer; it goes on
  along the origin's flooding tree (:meth:`routing.lsdb.Database.flood_targets`).
  An older copy than the one held is refused, and the sender gets the newer
  one back. A record that fails verification is dropped (the database logs
  it with the sender's node ID) and never used or passed on.
* A record of this node that is not the one it holds (a previous run's, with
  a higher sequence) is never installed: this node signs a fresh one above it.
* When a neighbour comes up, the two exchange what the other lacks (sync).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kme.types import NodeId
from routing.lsdb import Database, Outcome
from routing.origin import DeviceReading, Originator
from routing.records import RecordRefusedError, Signed, Signer

__all__ = ["LinkStateEngine", "Sends"]


@dataclass
class Sends:
    """Records to send, per neighbour (in order, without repeats)."""

    by_node: dict[NodeId, list[Signed]] = field(default_factory=lambda: defaultdict(list))

    def add(self, node: NodeId, signed: Signed) -> None:
        queue = self.by_node[node]
        if signed not in queue:
            queue.append(signed)

    def merge(self, other: Sends) -> None:
        for node, records in other.by_node.items():
            for r in records:
                self.add(node, r)

    def __bool__(self) -> bool:
        return any(self.by_node.values())


class LinkStateEngine:
    """Thread-safe. ``now_ms`` is Unix time in milliseconds (simulated in the simulator)."""

    def __init__(self, db: Database, originator: Originator, signer: Signer,
                 log: logging.Logger | None = None,
                 now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 on_change: Callable[[], None] | None = None) -> None:
        if signer.node != db.me or originator.me != db.me:
            raise ValueError(f"the signer ({signer.node}) and the originator "
                             f"({originator.me}) must be this node ({db.me})")
        self.db = db
        self.originator = originator
        self._signer = signer
        self._log = log or logging.getLogger("kmstn.routing.linkstate")
        self._now = now_ms
        self._on_change: Callable[[], None] = on_change or (lambda: None)
        self._neighbours: set[NodeId] = set()
        self._lock = threading.RLock()
        self.signatures = 0  # records this node signed (benchmarks)

    @property
    def me(self) -> NodeId:
        return self.db.me

    def set_on_change(self, fn: Callable[[], None]) -> None:
        """Called (outside the engine's lock) after every change to the database."""
        self._on_change = fn

    # -- inputs ------------------------------------------------------------------

    def submit(self, from_node: NodeId, records: Iterable[Signed]) -> Sends:
        """Records a neighbour sent us."""
        sends = Sends()
        changed = False
        with self._lock:
            for signed in records:
                origin, _ = signed.peek_header()
                if origin == self.me:
                    self._own_seen(signed, from_node, sends)
                    continue
                outcome = self.db.install(signed, from_node)
                changed |= self._flood(outcome, from_node, sends)
        if changed:
            self._on_change()
        return sends

    def _own_seen(self, signed: Signed, from_node: NodeId, sends: Sends) -> None:
        try:
            verified = self.db.verifier.verify(signed)
        except RecordRefusedError:
            # Not ours after all (forged): the database refuses and logs it.
            self.db.install(signed, from_node)
            return
        held = self.db.get(self.me)
        held_seq = held.verified.record.sequence if held is not None else 0
        if verified.record.sequence > held_seq:
            # A previous run of this node signed it: sign above it, at once.
            self.originator.saw_own(verified.record.sequence)
            self._originate(sends)
        elif verified.record.sequence < held_seq and held is not None:
            sends.add(from_node, held.verified.signed)

    def _flood(self, outcome: Outcome, from_node: NodeId | None, sends: Sends) -> bool:
        if outcome.installed and outcome.verified is not None:
            origin = outcome.verified.record.origin
            for n in self.db.flood_targets(origin, self._neighbours, from_node):
                sends.add(n, outcome.verified.signed)
            return True
        if outcome.newer_held is not None and from_node is not None:
            sends.add(from_node, outcome.newer_held)
        return False

    def report(self, neighbours_up: Mapping[NodeId, bool],
               devices: Mapping[str, DeviceReading]) -> Sends:
        """The relay's view of this node's links now; signs a record when it matters."""
        sends = Sends()
        now = self._now()
        with self._lock:
            # A neighbour that just came up is synced by the adjacency layer
            # (routing.adjacency): both sides swap headers and send what the
            # other lacks, rather than everything.
            self._neighbours = {n for n, up in neighbours_up.items() if up}
            self.originator.observe(neighbours_up, devices, now)
            changed = bool(self.db.expire())
            if self.originator.due(now):
                self._originate(sends)
                changed = True
        if changed:
            self._on_change()
        return sends

    def override(self, link_id: str, up: bool, cost: float | None) -> Sends:
        """An operator's change to a link of this node: a new record at once."""
        sends = Sends()
        with self._lock:
            mine = self.originator.override(link_id, up, cost)
            if mine:
                self._originate(sends)
        if mine:
            self._on_change()
        return sends

    def _originate(self, sends: Sends) -> None:
        record = self.originator.build(self._now())
        signed = self._signer.sign(record)
        self.signatures += 1
        outcome = self.db.install(signed, None)
        if not outcome.installed:  # a bug: our own fresh record must install
            self._log.error("own link-state record not installed",
                            extra={"reason": outcome.reason})
            return
        self._log.debug("link-state record signed", extra={
            "sequence": record.sequence,
            "links_up": [link.link_id for link in record.links if link.up]})
        for n in self.db.flood_targets(self.me, self._neighbours, None):
            sends.add(n, signed)

    # -- anti-entropy -------------------------------------------------------------

    def sync(self, from_node: NodeId, theirs: Mapping[str, int]) -> tuple[list[Signed],
                                                                       dict[NodeId, int]]:
        """What ``from_node`` (with headers ``theirs``) lacks, and our headers."""
        with self._lock:
            return self.db.missing_for(theirs), self.db.headers()

    def missing_for(self, theirs: Mapping[str, int]) -> list[Signed]:
        return self.db.missing_for(theirs)

    @property
    def digest(self) -> str:
        return self.db.digest()
