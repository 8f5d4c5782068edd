"""Expiry: keys and outbox jobs past their time, and tombstones past theirs.

:func:`expire` is one sweep over the database; :class:`Sweeper` is the
background thread that runs it whenever something falls due, without
polling. Expired keys leave tombstones ('expired'); expired jobs are deleted
and named in the sweep's log line (their work will not be done).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyvault import outbox
from keyvault.db import Database
from keyvault.rows import Burial, bury, grants_of
from kme import metrics

if TYPE_CHECKING:
    from keyvault.store import Vault

__all__ = ["Sweeper", "Swept", "expire"]

_SWEEP_BATCH: Final = 1000


@dataclass(frozen=True, slots=True)
class Swept:
    """One expiry sweep: what it removed, and when the next thing falls due."""

    keys: list[uuid.UUID]
    jobs: list[outbox.ExpiredJob]
    next_us: int | None  # epoch microseconds; None when nothing is waiting
    bits: int = 0  # key bits of the expired keys


def expire(db: Database, tombstone_ttl_us: int) -> Swept:
    """Expire due keys and jobs, purge old tombstones, in batches of 1000."""
    now = db.now_us()
    expired: list[uuid.UUID] = []
    jobs: list[outbox.ExpiredJob] = []
    bits = 0
    while True:
        with db.write() as conn:
            due = conn.execute(
                "SELECT key_id, master, upstream, size_bits FROM keys WHERE expires_us <= ? "
                "LIMIT ?", (now, _SWEEP_BATCH)).fetchall()
            ids = [r[0] for r in due]
            bits += sum(r[3] for r in due)
            grants = grants_of(conn, ids) if ids else {}
            bury(conn, [Burial(k, m, list(grants[k]), u) for k, m, u, _ in due], "expired",
                 now, tombstone_ttl_us)
            conn.execute("DELETE FROM tombstones WHERE purge_us <= ?", (now,))
            gone = outbox.sweep_expired(conn, now, _SWEEP_BATCH)
            more = len(due) == _SWEEP_BATCH or len(gone) == _SWEEP_BATCH
            if not more:
                nxt = conn.execute(
                    "SELECT min(t) FROM (SELECT min(expires_us) AS t FROM keys "
                    "UNION ALL SELECT min(purge_us) FROM tombstones "
                    "UNION ALL SELECT min(expires_us) FROM jobs)").fetchone()[0]
        expired += [uuid.UUID(k) for k in ids]
        jobs += gone
        if not more:
            return Swept(expired, jobs, int(nxt) if nxt is not None else None, bits)


class Sweeper:
    """A background thread that expires keys and jobs when they fall due (no polling).

    It sleeps until the earliest expiry (or tombstone purge) in the database,
    and is woken early only by a commit that brings a key or job expiring
    sooner.
    """

    MAX_SLEEP_S: Final = 60.0

    def __init__(self, vault: Vault, log: logging.Logger,
                 clock: Callable[[], float] = time.time) -> None:
        self._vault = vault
        self._log = log
        self._clock = clock
        self._cond = threading.Condition()
        self._wake_us: int | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="keyvault-expiry", daemon=True)
        vault.on_store(self._stored)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _stored(self, soonest_us: int) -> None:
        with self._cond:
            if self._wake_us is None or soonest_us < self._wake_us:
                self._wake_us = soonest_us
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._wake_us = None
            next_us: int | None = None
            try:
                swept = self._vault.expire()
            except Exception:
                if self._vault.closed:
                    return
                self._log.exception("expiry sweep failed")
            else:
                self._report(swept)
                next_us = swept.next_us
            self._sleep(next_us)

    def _report(self, swept: Swept) -> None:
        if swept.keys:
            metrics.count_keyvault_keys("expired", len(swept.keys))
            metrics.count_key_bits("expired", swept.bits)
            self._log.info("keys expired", extra={
                "count": len(swept.keys), "key_ids": [str(k) for k in swept.keys[:100]]})
        if swept.jobs:
            # Work that will now never be done: a warning, with what it was for.
            self._log.warning("outbox jobs expired", extra={
                "count": len(swept.jobs),
                "jobs": [{"job_id": str(j.job_id), "kind": j.kind,
                          "destination": j.destination_node_id, "attempts": j.attempts}
                         for j in swept.jobs[:100]]})

    def _sleep(self, next_us: int | None) -> None:
        """Wait until the next due time (or a sooner store, or stop)."""
        with self._cond:
            if next_us is not None and (self._wake_us is None or next_us < self._wake_us):
                self._wake_us = next_us
            # Sweep at least once a minute even if nothing is due, so a clock
            # step cannot leave keys waiting long past their expiry.
            limit = int(self._clock() * 1_000_000) + int(self.MAX_SLEEP_S * 1_000_000)
            while not self._stopping:
                now_us = int(self._clock() * 1_000_000)
                due = min(self._wake_us, limit) if self._wake_us is not None else limit
                if due <= now_us:
                    return
                self._cond.wait((due - now_us) / 1e6 + 0.002)
