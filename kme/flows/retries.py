"""Work that is tried again until it gets through: voids, concurrent deliveries, acks.

Two layers:

- :class:`Retrier` keeps a schedule in memory: one thread waits for the next
  due job and runs the attempt on the flows' pool, so a slow attempt delays
  no other. A job returns when done and raises KmstnError when it failed; a
  failure that may pass (node or path unreachable, timeout) is tried again
  after the next delay, any other failure or the last delay gives up.
- :class:`Jobs` makes that work durable. A job is recorded in the keyvault
  (the :class:`~kme.flows.ports.JobStore`) before it is first tried, its
  attempts are counted there, and it is deleted once done or given up; when
  the relay starts, every recorded job is scheduled again. So a kill -9 of
  the relay loses no void and no delivery: after the restart each one
  completes, and no stray copy waits for its TTL.
"""

from __future__ import annotations

import functools
import heapq
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kme.errors import ErrorCode, KmstnError
from kme.flows.ports import Job, JobStore
from kme.types import NodeId, SecretBytes

__all__ = ["TRANSIENT", "Jobs", "Retrier"]

# Failures that may pass: the work is worth sending again.
TRANSIENT = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.NO_ROUTE,
                       ErrorCode.UNKNOWN_SESSION})


@dataclass(frozen=True)
class _RetryJob:
    fn: Callable[[], None]
    about: dict[str, Any]
    on_give_up: Callable[[KmstnError], None] | None


class Retrier:
    """Runs failed background jobs again later, with growing delays.

    ``delays[i]`` is the wait before attempt ``i + 1``; after the last one
    the job gives up: ``on_give_up`` gets the last error, or it is logged.
    """

    def __init__(self, log: logging.Logger, delays: Sequence[float] = (0.5, 1, 2, 4, 8, 16),
                 limit: int = 10_000,
                 run: Callable[[Callable[[], None]], object] | None = None) -> None:
        self._log = log
        self._delays = tuple(delays)
        self._limit = limit
        self._run_attempt = run or (lambda fn: fn())
        self._heap: list[tuple[float, int, int, _RetryJob]] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None], about: dict[str, Any],
               on_give_up: Callable[[KmstnError], None] | None = None, *,
               attempt: int = 0, delay: float | None = None) -> None:
        """Run ``job`` after the delay of ``attempt`` (or ``delay``), and again while it fails."""
        self._schedule(_RetryJob(job, about, on_give_up), min(attempt, len(self._delays) - 1),
                       delay)

    def _schedule(self, job: _RetryJob, attempt: int, delay: float | None = None) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._heap) >= self._limit:
                self._log.error("retry queue full; job dropped", extra=job.about)
                return
            due = time.monotonic() + (self._delays[attempt] if delay is None else delay)
            heapq.heappush(self._heap, (due, self._seq, attempt, job))
            self._seq += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._keep_schedule,
                                                name="flows-retry", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _keep_schedule(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, attempt, job = heapq.heappop(self._heap)
            try:
                self._run_attempt(functools.partial(self._attempt, job, attempt))
            except RuntimeError:  # the pool shut down: the flows are closing
                return

    def _attempt(self, job: _RetryJob, attempt: int) -> None:
        try:
            job.fn()
        except KmstnError as exc:
            if exc.code in TRANSIENT and attempt + 1 < len(self._delays):
                self._schedule(job, attempt + 1)
            elif job.on_give_up is not None:
                job.on_give_up(exc)
            else:
                self._log.error("gave up after retries", extra={
                    **job.about, "attempts": attempt + 2, "error_code": exc.code.name,
                    "error": exc.public})
        except Exception:
            self._log.exception("retried job crashed", extra=job.about)

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


# Durable jobs are retried on this schedule (seconds before attempt n), the
# last delay repeating, until the job expires: a path that is down for an
# hour still gets its voids once it is back.
JOB_DELAYS: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16, 30)
_JOB_TTL_S = 86_400.0


def _now() -> datetime:
    return datetime.now(UTC)


Handler = Callable[[Job], None]
GiveUp = Callable[[Job, KmstnError], None]


class Jobs:
    """Durable, retried work, by kind: recorded first, tried, retried, deleted when done."""

    def __init__(self, store: JobStore, log: logging.Logger,
                 run: Callable[[Callable[[], None]], object], ttl_s: float = _JOB_TTL_S,
                 delays: Sequence[float] = JOB_DELAYS) -> None:
        self._store = store
        self._log = log
        self._ttl_ms = int(ttl_s * 1000)
        self._delays = tuple(delays)
        self._retrier = Retrier(log, run=run)
        self._run = run
        self._kinds: dict[str, tuple[Handler, GiveUp | None]] = {}
        self._lock = threading.Lock()
        self._running: set[uuid.UUID] = set()

    def register(self, kind: str, handler: Handler, on_give_up: GiveUp | None = None) -> None:
        self._kinds[kind] = (handler, on_give_up)

    def new(self, kind: str, destination: NodeId, payload: bytes,
            not_before_unix_ms: int = 0) -> Job:
        now = _now()
        due = max(now, datetime.fromtimestamp(not_before_unix_ms / 1000, UTC))
        return Job(uuid.uuid4(), kind, destination, SecretBytes(payload),
                   now + timedelta(milliseconds=self._ttl_ms), due)

    def record(self, jobs: Sequence[Job]) -> None:
        """Make ``jobs`` durable (one keyvault transaction) without trying them yet."""
        if jobs:
            self._store.put(jobs)

    def start(self, jobs: Sequence[Job]) -> None:
        """Schedule recorded jobs: each runs at its due time, then again while it fails."""
        now = _now()
        for job in jobs:
            with self._lock:
                if job.job_id in self._running:
                    continue
                self._running.add(job.job_id)
            due = job.next_due_at or now
            delay = max(0.0, (due - now).total_seconds())
            self._run_later(job, delay)

    def submit(self, jobs: Sequence[Job]) -> None:
        self.record(jobs)
        self.start(jobs)

    def resume(self, page: int = 1000) -> int:
        """At start: schedule every job a previous run left recorded.

        The keyvault lists the jobs due now and says when the next one falls
        due; this runs again then, so a job a previous run postponed is not
        forgotten either (jobs already scheduled here are skipped).
        """
        jobs, next_due = self._store.due(page)
        self.start(jobs)
        if jobs:
            self._log.info("pending work resumed", extra={
                "jobs": len(jobs), "kinds": sorted({j.kind for j in jobs})})
        if next_due is not None:
            wait = max(0.05, (next_due - _now()).total_seconds())
            self._retrier.submit(self._resume_later, {"job": "resume"}, delay=wait)
        return len(jobs)

    def resume_at_start(self) -> None:
        """:meth:`resume`, and while the keyvault cannot answer (still starting, or
        slow), again every second: recorded work is never left behind for that."""
        self._resume_later(retry_s=1.0)

    def _resume_later(self, retry_s: float = 5.0) -> None:
        try:
            self.resume()
        except KmstnError as exc:  # the keyvault is away: look again shortly
            self._log.warning("could not list pending work", extra={
                "error_code": exc.code.name, "error": exc.public, "retry_s": retry_s})
            self._retrier.submit(lambda: self._resume_later(retry_s), {"job": "resume"},
                                 delay=retry_s)

    def _run_later(self, job: Job, delay: float) -> None:
        about = {"job_id": str(job.job_id), "kind": job.kind,
                 "destination": job.destination_node_id}
        state = {"job": job}

        def attempt() -> None:
            current = state["job"]
            if _now() > current.expires_at:
                raise KmstnError(ErrorCode.TIMEOUT, "pending work expired")
            handler, _ = self._kinds[current.kind]
            try:
                handler(current)
            except KmstnError as exc:
                if exc.code in TRANSIENT:
                    attempts = current.attempts + 1
                    wait = self._delays[min(attempts, len(self._delays) - 1)]
                    due = _now() + timedelta(seconds=wait)
                    self._record_retry(current, due)
                    state["job"] = replace(current, attempts=attempts, next_due_at=due)
                    self._log.warning("pending work will be tried again", extra={
                        **about, "attempts": attempts, "error_code": exc.code.name,
                        "error": exc.public})
                    self._retrier.submit(attempt, about, give_up, delay=wait)
                    return
                raise
            self._finish(current)

        def give_up(exc: KmstnError) -> None:
            current = state["job"]
            _, on_give_up = self._kinds[current.kind]
            self._log.error("pending work given up", extra={
                **about, "attempts": current.attempts + 1, "error_code": exc.code.name,
                "error": exc.public, "cause": exc.cause})
            try:
                if on_give_up is not None:
                    on_give_up(current, exc)
            finally:
                self._finish(current)

        def first() -> None:
            try:
                attempt()
            except KmstnError as exc:
                give_up(exc)
            except Exception:
                self._log.exception("pending work crashed", extra=about)
                with self._lock:
                    self._running.discard(job.job_id)

        if delay <= 0:
            self._run(first)
        else:
            self._retrier.submit(first, about, delay=delay)

    def _record_retry(self, job: Job, due: datetime) -> None:
        try:
            self._store.retry_later(job.job_id, due)
        except KmstnError as exc:  # the keyvault is away: the in-memory schedule goes on
            self._log.warning("could not record a retry", extra={
                "job_id": str(job.job_id), "error_code": exc.code.name})

    def _finish(self, job: Job) -> None:
        try:
            self._store.done(job.job_id)
        except KmstnError as exc:
            # Still recorded: it runs once more after a restart, which is
            # harmless (voids, acks and resent ext_keys are idempotent).
            self._log.warning("could not delete finished work", extra={
                "job_id": str(job.job_id), "error_code": exc.code.name})
        with self._lock:
            self._running.discard(job.job_id)

    def pending(self) -> int:
        with self._lock:
            return len(self._running)

    def close(self) -> None:
        self._retrier.close()
