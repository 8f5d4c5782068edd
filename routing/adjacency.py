"""Neighbour liveness from hellos, and when two neighbours must sync their databases.

Each node says hello to each kmstn neighbour every hello interval and hears
theirs. A neighbour is **up** while a hello was exchanged with it, in either
direction, within the dead interval; so one that stops answering is down
after at most the dead interval, and the link to it leaves both ends' next
records.

Hellos carry the digest of each side's link-state database. A sync (each
side sends what the other lacks) is due when a neighbour comes up, and when
the two digests differ at two hellos in a row without either changing in
between: flooding takes milliseconds, so a difference that outlasts a hello
interval is one that flooding will not mend (a tree that missed a node,
records lost with a connection).

Pure bookkeeping on a clock the caller passes in: the relay's link-state
agent (relay/linkstate.py) and the simulator (routing.simulate) both use it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from kme.types import NodeId

__all__ = ["Adjacencies"]


@dataclass
class _Peer:
    heard_ms: int | None = None
    up: bool = False
    sync: bool = False
    pair: tuple[str, str] | None = None


class Adjacencies:
    def __init__(self, neighbours: Iterable[NodeId], dead_ms: int) -> None:
        self._dead = dead_ms
        self._peers = {n: _Peer() for n in neighbours}
        self._lock = threading.Lock()

    @property
    def neighbours(self) -> tuple[NodeId, ...]:
        return tuple(self._peers)

    def heard(self, peer: NodeId, mine: str, theirs: str, now_ms: int) -> None:
        """A hello was exchanged with ``peer`` (our call answered, or theirs received)."""
        with self._lock:
            p = self._peers.get(peer)
            if p is None:
                return
            p.heard_ms = now_ms
            if not p.up:
                p.up, p.sync = True, True
            pair = (mine, theirs)
            if mine != theirs and p.pair == pair:
                p.sync = True
            p.pair = pair

    def states(self, now_ms: int) -> dict[NodeId, bool]:
        """Up or down, per neighbour, now."""
        with self._lock:
            for p in self._peers.values():
                if p.up and (p.heard_ms is None or now_ms - p.heard_ms > self._dead):
                    p.up, p.pair = False, None
            return {n: p.up for n, p in self._peers.items()}

    def take_sync(self, peer: NodeId) -> bool:
        """True once when a sync with ``peer`` is due."""
        with self._lock:
            p = self._peers.get(peer)
            if p is None or not p.up or not p.sync:
                return False
            p.sync, p.pair = False, None
            return True
