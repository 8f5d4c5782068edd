"""The link-state database: the newest verified record of every origin, and the graph they agree on.

:meth:`Database.install` is the only way in. A record is used only after it
passed :class:`routing.records.Verifier`; then it must be fresher than what is
held: a sequence number not above the one held is a replay (or a late copy)
and is refused, as is a record past its lifetime or signed too far in the
future. Refusals are logged (with the node they came from) and kept in a
small list that operators see (``kmstn topology``); a refused record changes
nothing.

The graph: a link between two kmstn nodes is used only when the records of
**both** ends announce it, with the same ID and kind, each naming the other,
both up. So no node, and no forged or stale record, can put a link into
anyone's graph alone; one end announcing it down is enough to take it out.
Its cost is the lower of the two ends' costs: each end measures the key its
device makes minus what the *other* end draws, so the higher rate is the
better estimate, and configured costs normally agree. A site link to a
foreign KMS, which runs no link state, is announced by its kmstn end alone.

The database keeps the usable links and an adjacency map current as records
come and go (only the links a new record touches are looked at again), so
that flooding (:meth:`flood_targets`) and the routing graph cost little per
record even with a thousand origins.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from kme.config import Link, LinkKindName
from kme.types import NodeId, SaeId
from routing.records import AnnouncedLink, RecordRefusedError, Signed, Verified, Verifier
from routing.table import LinkState

__all__ = ["Database", "Entry", "LearnedLink", "Outcome", "Refusal", "learned_graph"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What install() did with one record."""

    installed: bool
    # Why not: "duplicate", "replayed: ...", "expired", "from the future", or a
    # verification failure ("bad signature", ...); "" when installed.
    reason: str = ""
    verified: Verified | None = None
    # The copy held here when it is newer than the one offered (the sender
    # should get it back).
    newer_held: Signed | None = None
    # True when the offered record failed verification (forged or tampered).
    forged: bool = False


@dataclass(frozen=True, slots=True)
class Entry:
    verified: Verified
    received_from: NodeId | None  # None: this node's own record
    installed_ms: int


@dataclass(frozen=True, slots=True)
class LearnedLink:
    """A link as the records of its ends describe it; ``up`` only if routing may use it."""

    link_id: str
    kind: LinkKindName
    a: NodeId
    b: NodeId
    cost: float
    up: bool
    ends: tuple[tuple[NodeId, AnnouncedLink], ...]


@dataclass
class Refusal:
    from_node: str
    origin: str
    sequence: int
    reason: str
    last_ms: int
    count: int = 1


@dataclass
class _Claims:
    """Who announces a link ID, and what each says."""

    by_node: dict[NodeId, AnnouncedLink] = field(default_factory=dict)


class Database:
    """One node's link-state database. Thread-safe; ``now_ms`` is Unix time in ms."""

    def __init__(self, me: NodeId, verifier: Verifier, log: logging.Logger | None = None,
                 now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 max_future_ms: int = 60_000, refusals_kept: int = 64) -> None:
        self._me = me
        self._verifier = verifier
        self._log = log or logging.getLogger("kmstn.routing.lsdb")
        self._now = now_ms
        self._max_future = max_future_ms
        self._entries: dict[NodeId, Entry] = {}
        self._claims: dict[str, _Claims] = {}
        self._known: dict[str, LearnedLink] = {}
        self._adjacent: dict[NodeId, set[NodeId]] = {}
        # Usable links per pair of nodes (a pair may have a QKD and a PQC link).
        self._pairs: dict[frozenset[NodeId], int] = {}
        self._refusals: deque[Refusal] = deque(maxlen=refusals_kept)
        self._digest: str | None = None
        self._lock = threading.RLock()
        self.version = 0

    # -- reading ---------------------------------------------------------------

    @property
    def me(self) -> NodeId:
        return self._me

    @property
    def verifier(self) -> Verifier:
        return self._verifier

    def entries(self) -> dict[NodeId, Entry]:
        with self._lock:
            return dict(self._entries)

    def get(self, origin: str) -> Entry | None:
        with self._lock:
            return self._entries.get(NodeId(origin))

    def headers(self) -> dict[NodeId, int]:
        with self._lock:
            return {o: e.verified.record.sequence for o, e in self._entries.items()}

    def digest(self) -> str:
        """A short hash of every (origin, sequence) held: equal digests, equal databases."""
        with self._lock:
            if self._digest is None:
                h = hashlib.sha256()
                for origin in sorted(self._entries):
                    h.update(f"{origin}:{self._entries[origin].verified.record.sequence};"
                             .encode())
                self._digest = h.hexdigest()[:16]
            return self._digest

    def refusals(self) -> list[Refusal]:
        with self._lock:
            return list(self._refusals)

    def links(self) -> list[LearnedLink]:
        """Every link the records name; those routing may use are ``up``."""
        with self._lock:
            return list(self._known.values())

    def link(self, link_id: str) -> LearnedLink | None:
        with self._lock:
            return self._known.get(link_id)

    def nodes(self) -> set[NodeId]:
        """Every origin held, every foreign KMS one announces, every end of a named link."""
        with self._lock:
            out = set(self._entries)
            for e in self._entries.values():
                out.update(f.node for f in e.verified.record.foreign)
            for link in self._known.values():
                out.update((link.a, link.b))
            return out

    def saes(self) -> dict[SaeId, NodeId]:
        """Which node serves each SAE, as the records say.

        An SAE named by two origins is ambiguous; it is left out (and logged
        when the record that makes it so arrives) rather than given to either.
        """
        with self._lock:
            claims: dict[SaeId, set[NodeId]] = {}
            for origin, e in self._entries.items():
                for s in e.verified.record.saes:
                    claims.setdefault(s, set()).add(origin)
                for f in e.verified.record.foreign:
                    for s in f.saes:
                        claims.setdefault(s, set()).add(f.node)
            return {s: next(iter(n)) for s, n in claims.items() if len(n) == 1}

    def missing_for(self, theirs: Mapping[str, int]) -> list[Signed]:
        """The records held here that a node with headers ``theirs`` lacks or holds older."""
        with self._lock:
            return [e.verified.signed for o, e in self._entries.items()
                    if theirs.get(o, 0) < e.verified.record.sequence]

    def start_from(self, other: Database) -> None:
        """Hold exactly what ``other`` holds (the simulator starts a thousand nodes so)."""
        with other._lock, self._lock:
            self._entries = dict(other._entries)
            self._claims = {k: _Claims(dict(v.by_node)) for k, v in other._claims.items()}
            self._known = dict(other._known)
            self._adjacent = {k: set(v) for k, v in other._adjacent.items()}
            self._pairs = dict(other._pairs)
            self._digest = None
            self.version += 1

    # -- writing ---------------------------------------------------------------

    def install(self, signed: Signed, from_node: NodeId | None) -> Outcome:
        """Verify and keep ``signed`` if it is newer than the copy held; never raises."""
        try:
            verified = self._verifier.verify(signed)
        except RecordRefusedError as exc:
            self._refuse(from_node, exc.origin, exc.sequence, exc.why, forged=True)
            return Outcome(False, exc.why, forged=True)
        record = verified.record
        now = self._now()
        with self._lock:
            held = self._entries.get(record.origin)
            if held is not None:
                seq = held.verified.record.sequence
                if record.sequence == seq and held.verified.signed == signed:
                    return Outcome(False, "duplicate", verified)
                if record.sequence <= seq:
                    why = f"replayed: sequence {record.sequence} not above {seq} held"
                    self._refuse(from_node, record.origin, record.sequence, why)
                    return Outcome(False, why, verified, newer_held=held.verified.signed)
            if record.expires_ms <= now:
                self._refuse(from_node, record.origin, record.sequence, "expired")
                return Outcome(False, "expired", verified)
            if record.originated_ms > now + self._max_future:
                self._refuse(from_node, record.origin, record.sequence, "from the future")
                return Outcome(False, "from the future", verified)
            self._put(record.origin, Entry(verified, from_node, now))
        return Outcome(True, "", verified)

    def expire(self) -> list[NodeId]:
        """Forget records past their lifetime (this node's own is refreshed, never expired)."""
        now = self._now()
        with self._lock:
            gone = [o for o, e in self._entries.items()
                    if o != self._me and e.verified.record.expires_ms <= now]
            for origin in gone:
                self._put(origin, None)
        for origin in gone:
            self._log.info("link-state record aged out", extra={"origin": origin})
        return gone

    def _put(self, origin: NodeId, entry: Entry | None) -> None:
        """Replace (or drop) an origin's record and bring the graph up to date (lock held)."""
        old = self._entries.get(origin)
        touched: set[str] = set()
        if old is not None:
            for link in old.verified.record.links:
                claims = self._claims.get(link.link_id)
                if claims is not None:
                    claims.by_node.pop(origin, None)
                touched.add(link.link_id)
        if entry is None:
            self._entries.pop(origin, None)
        else:
            self._entries[origin] = entry
            for link in entry.verified.record.links:
                self._claims.setdefault(link.link_id, _Claims()).by_node[origin] = link
                touched.add(link.link_id)
        for link_id in touched:
            self._recheck(link_id)
        if entry is not None:
            self._warn_ambiguous(entry)
        self._digest = None
        self.version += 1

    def _recheck(self, link_id: str) -> None:
        before = self._known.pop(link_id, None)
        if before is not None and before.up:
            self._unlink(before.a, before.b)
        claims = self._claims.get(link_id)
        if claims is None or not claims.by_node:
            self._claims.pop(link_id, None)
            return
        now = self._describe(link_id, claims)
        if now is not None:
            self._known[link_id] = now
            if now.up:
                pair = frozenset((now.a, now.b))
                self._pairs[pair] = self._pairs.get(pair, 0) + 1
                self._adjacent.setdefault(now.a, set()).add(now.b)
                self._adjacent.setdefault(now.b, set()).add(now.a)

    def _unlink(self, a: NodeId, b: NodeId) -> None:
        # Another usable link may still join the pair (a QKD link and a PQC one):
        # the pair stays adjacent until its last usable link goes.
        pair = frozenset((a, b))
        left = self._pairs.get(pair, 0) - 1
        if left > 0:
            self._pairs[pair] = left
            return
        self._pairs.pop(pair, None)
        self._adjacent.get(a, set()).discard(b)
        self._adjacent.get(b, set()).discard(a)

    def _describe(self, link_id: str, claims: _Claims) -> LearnedLink | None:
        """The link as its claims describe it: up only if usable; None if they contradict."""
        ends = sorted(claims.by_node.items())
        if len(ends) == 1:
            (node, link), = ends
            foreign = {f.node for f in self._entries[node].verified.record.foreign}
            site = link.kind == "site" and link.neighbour in foreign
            # A kmstn link only one end announces is known, and down.
            return LearnedLink(link_id, link.kind, node, link.neighbour, link.cost,
                               site and link.up, tuple(ends))
        if len(ends) != 2:
            return None
        (x, lx), (y, ly) = ends
        if lx.neighbour != y or ly.neighbour != x or lx.kind != ly.kind or lx.kind == "site":
            return None
        return LearnedLink(link_id, lx.kind, x, y, min(lx.cost, ly.cost), lx.up and ly.up,
                           ((x, lx), (y, ly)))

    def _warn_ambiguous(self, entry: Entry) -> None:
        record = entry.verified.record
        mine = set(record.saes)
        if not mine:
            return
        for origin, other in self._entries.items():
            if origin != record.origin and mine & set(other.verified.record.saes):
                self._log.warning("an SAE is named by two nodes; it is not routed to", extra={
                    "origin": record.origin, "other": origin,
                    "sae_ids": sorted(mine & set(other.verified.record.saes))})

    def _refuse(self, from_node: NodeId | None, origin: str, sequence: int, reason: str,
                forged: bool = False) -> None:
        now = self._now()
        sender = from_node or ""
        with self._lock:
            for r in self._refusals:
                if (r.from_node, r.origin, r.reason) == (sender, origin, reason):
                    r.count += 1
                    r.last_ms, r.sequence = now, sequence
                    break
            else:
                self._refusals.append(Refusal(sender, origin, sequence, reason, now))
        # A forged or tampered record is worth a warning naming who sent it; a
        # late copy in a flood is normal and only debug.
        level = logging.WARNING if forged else logging.DEBUG
        self._log.log(level, "link-state record refused", extra={
            "peer": sender, "origin": origin, "sequence": sequence, "reason": reason})

    # -- flooding ----------------------------------------------------------------

    def flood_targets(self, origin: NodeId, neighbours: Iterator[NodeId] | set[NodeId],
                      from_node: NodeId | None) -> list[NodeId]:
        """Which of this node's neighbours should get ``origin``'s record from us.

        Records travel along one tree per origin (reverse-path flooding): a
        node passes a record to a neighbour only if, in the graph it holds,
        it is that neighbour's parent in the breadth-first tree from the
        origin (ties to the lower node ID). Every node that holds the same
        graph picks the same tree, so a record crosses each tree edge once,
        instead of every link once or twice.

        The tree's first level is what the record being flooded announces
        (the origin's links that it says are up), the rest the links both
        ends announce up. A link that changes is announced by both its ends,
        in two records that cross the network at the same time, so nodes
        differ on whether the *other* end's record arrived yet; but every
        node passing on a record holds that record, so all agree on the links
        of its origin, and one link change never splits a tree. A neighbour
        the tree does not reach (its links not yet two-way) gets the record
        anyway; and hellos compare database digests, so a record that several
        changes at once made a tree miss is synced.
        """
        mine = [n for n in neighbours if n != from_node]
        if not mine:
            return []
        with self._lock:
            dist = self._bfs(origin)
            if self._me not in dist:
                return mine
            out = []
            for n in mine:
                d = dist.get(n)
                if d is None:
                    out.append(n)
                    continue
                if d == 0:
                    continue  # the origin itself has its record
                parent = origin if d == 1 else min(
                    p for p in self._adjacent.get(n, ()) if p != origin and dist.get(p) == d - 1)
                if parent == self._me:
                    out.append(n)
            return out

    def _bfs(self, origin: NodeId) -> dict[NodeId, int]:
        held = self._entries.get(origin)
        first = ({link.neighbour for link in held.verified.record.links
                  if link.up and link.kind != "site"} if held is not None else set())
        dist = {origin: 0}
        frontier = []
        for v in sorted(first):
            dist[v] = 1
            frontier.append(v)
        while frontier:
            nxt = []
            for u in frontier:
                for v in self._adjacent.get(u, ()):
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        nxt.append(v)
            frontier = nxt
        return dist


def learned_graph(db: Database) -> tuple[set[NodeId], list[LinkState], dict[SaeId, NodeId]]:
    """What routing.graph.RoutingTable.learn takes: nodes, every named link, the SAE map."""
    links = [LinkState(Link(x.link_id, x.kind, x.a, x.b, x.cost), x.up, x.cost)
             for x in db.links()]
    return db.nodes(), links, db.saes()
