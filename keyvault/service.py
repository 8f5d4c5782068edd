"""The kme.rpc.v1.KeyVault gRPC servicer: validate proto input, call the Vault, answer.

Every RPC validates its whole request before touching the store (the
conversions are :mod:`keyvault.convert`), and raises :class:`KmstnError`
(mapped to gRPC status codes in one place, kme.errors.ErrorInterceptor).
Messages name the offending field, e.g. ``keys[3].key.size_bits``; they
never carry key bytes or job payloads.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Final

import grpc

from keyvault import convert
from keyvault.convert import MAX_BATCH, bad, checked, key_ids
from keyvault.outbox import MAX_JOBS, MAX_LEASE_S
from keyvault.store import MAX_WAIT_S, Vault
from kme import metrics
from kme.errors import ErrorCode, KmstnError
from kme.log import log_context
from kme.rpc.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc
from kme.types import OutboxJob, job_kind, node_id, parse_key_id, sae_id

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "MAX_BATCH",
    "KeyVaultService",
]

DEFAULT_LIST_LIMIT: Final = 100
MAX_LIST_LIMIT: Final = 10_000
MAX_DUE_LIMIT: Final = 1000


class KeyVaultService(keyvault_pb2_grpc.KeyVaultServicer):
    def __init__(self, vault: Vault, log: logging.Logger, key_ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._vault = vault
        self._log = log
        self._key_ttl_s = key_ttl_s
        self._clock = clock

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    @staticmethod
    def _request_id(context: grpc.ServicerContext) -> str | None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and isinstance(value, str):
                return value[:64]
        return None

    def _jobs(self, messages: Sequence[keyvault_pb2.OutboxJob], now: dt.datetime,
              what: str = "jobs") -> list[OutboxJob]:
        if len(messages) > MAX_JOBS:
            raise bad(f"{what}: at most {MAX_JOBS} per call, got {len(messages)}")
        jobs = []
        for i, msg in enumerate(messages):
            job = convert.job_from_proto(msg, f"{what}[{i}]")
            if job.expires_at <= now:
                raise bad(f"{what}[{i}].expires_at: is in the past")
            jobs.append(job)
        return jobs

    def _log_jobs(self, jobs: Sequence[OutboxJob]) -> None:
        if jobs:
            self._log.info("outbox jobs recorded", extra={"jobs": [
                {"job_id": str(j.job_id), "kind": j.kind, "destination": j.destination_node_id}
                for j in jobs]})

    def Store(  # noqa: N802 - gRPC method name
        self, request: keyvault_pb2.StoreRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StoreResponse:
        if not request.keys:
            raise bad("keys: at least one key is required")
        if len(request.keys) > MAX_BATCH:
            raise bad(f"keys: at most {MAX_BATCH} per call, got {len(request.keys)}")
        now = self._now()
        grants = [convert.grant_from_proto(k, f"keys[{i}]", now, self._key_ttl_s)
                  for i, k in enumerate(request.keys)]
        jobs = self._jobs(request.jobs, now)
        with log_context(request_id=self._request_id(context)):
            outcome = self._vault.store_keys(grants, jobs)
            metrics.count_keyvault_keys("stored", len(outcome.stored))
            self._log.debug("keys stored", extra={
                "count": len(outcome.stored), "repeated": len(outcome.already_held),
                "already_delivered": [str(k) for k in outcome.already_delivered],
                "key_ids": [str(g.key.key_id) for g in grants]})
            self._log_jobs(jobs)
        return convert.store_outcome_to_proto(outcome)

    def Take(  # noqa: N802
        self, request: keyvault_pb2.TakeRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.TakeResponse:
        sae = checked("sae_id", sae_id, request.sae_id)
        master = checked("master_sae_id", sae_id, request.master_sae_id)
        if not request.key_ids:
            raise bad("key_ids: at least one key_ID is required")
        ids = key_ids(request.key_ids)
        if request.wait_ms > MAX_WAIT_S * 1000:
            raise bad(f"wait_ms: at most {int(MAX_WAIT_S * 1000)}, got {request.wait_ms}")
        wait_s = request.wait_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            # Leave time to answer before the caller's deadline.
            wait_s = max(0.0, min(wait_s, remaining - 0.05))
        def still_wanted() -> bool:
            # The answer must be able to reach the caller: never delete keys
            # for a call whose deadline has passed or that was cancelled.
            left = context.time_remaining()
            return bool(context.is_active()) and (left is None or left > 0.01)

        with log_context(request_id=self._request_id(context), sae_id=sae):
            with metrics.track_waiting_take(wait_s > 0):
                keys = self._vault.take(sae, master, ids, wait_s, still_wanted)
            metrics.count_keyvault_keys("taken", len(keys))
            self._log.info("keys taken", extra={"master_sae_id": master,
                                                "key_ids": [str(k) for k in ids]})
        return keyvault_pb2.TakeResponse(keys=[
            common_pb2.KeyMaterial(key_id=str(k.key_id), value=k.material.reveal(),
                                   size_bits=k.size_bits) for k in keys])

    def Holds(  # noqa: N802
        self, request: keyvault_pb2.HoldsRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.HoldsResponse:
        sae = checked("sae_id", sae_id, request.sae_id)
        master = checked("master_sae_id", sae_id, request.master_sae_id)
        ids = key_ids(request.key_ids)
        held = self._vault.holds(sae, master, ids)
        # In request order, without repeats.
        return keyvault_pb2.HoldsResponse(
            key_ids=[str(k) for k in dict.fromkeys(ids) if k in held])

    def Status(  # noqa: N802
        self, request: keyvault_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StatusResponse:
        master = (checked("master_sae_id", sae_id, request.master_sae_id)
                  if request.master_sae_id else None)
        slave = (checked("slave_sae_id", sae_id, request.slave_sae_id)
                 if request.slave_sae_id else None)
        pairs, total = self._vault.status(master, slave)
        return keyvault_pb2.StatusResponse(
            pairs=[keyvault_pb2.PairCount(master_sae_id=m, slave_sae_id=s, count=n)
                   for (m, s), n in pairs.items()],
            total_keys=total)

    def Void(  # noqa: N802
        self, request: keyvault_pb2.VoidRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.VoidResponse:
        ids = key_ids(request.key_ids)
        initiator = checked("initiator_sae_id", sae_id, request.initiator_sae_id)
        if not request.target_sae_ids:
            raise bad("target_sae_ids: at least one SAE is required")
        targets = tuple(checked(f"target_sae_ids[{i}]", sae_id, s)
                        for i, s in enumerate(request.target_sae_ids))
        upstream = (checked("upstream_node_id", node_id, request.upstream_node_id)
                    if request.upstream_node_id else None)
        jobs = self._jobs(request.jobs, self._now())
        with log_context(request_id=self._request_id(context)):
            try:
                outcome = self._vault.void(ids, initiator, targets, request.all_confirmation,
                                           upstream=upstream, jobs=jobs)
            except KmstnError as exc:
                if exc.code is ErrorCode.PERMISSION_DENIED:
                    # A neighbour named a key it has no say over (issue 16).
                    self._log.warning("void refused", extra={
                        "upstream_node_id": upstream, "initiator_sae_id": initiator,
                        "target_sae_ids": list(targets), "key_ids": [str(k) for k in ids],
                        "error": exc.public})
                raise
            metrics.count_keyvault_keys("voided", len(outcome.voided))
            # local: this node's own void (after a failed delivery); requested:
            # a neighbour's ETSI 020 void.
            metrics.count_key_bits("voided", outcome.voided_bits,
                                   "requested" if upstream else "local")
            self._log.info("void", extra={
                "initiator_sae_id": initiator, "target_sae_ids": list(targets),
                "upstream_node_id": upstream, "all": not ids,
                "voided": [str(k) for k in outcome.voided],
                "failed_to_void": [str(k) for k in outcome.failed_to_void],
                "not_present": [str(k) for k in outcome.not_present]})
            self._log_jobs(jobs)
        return keyvault_pb2.VoidResponse(
            acks=convert.outcome_to_acks(outcome, initiator, targets))

    def ListPending(  # noqa: N802
        self, request: keyvault_pb2.ListPendingRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.ListPendingResponse:
        limit = request.limit or DEFAULT_LIST_LIMIT
        if limit > MAX_LIST_LIMIT:
            raise bad(f"limit: at most {MAX_LIST_LIMIT}, got {limit}")
        sae = checked("sae_id", sae_id, request.sae_id) if request.sae_id else None
        infos = self._vault.list_pending(limit, sae)
        return keyvault_pb2.ListPendingResponse(
            keys=[convert.record_info_to_proto(i) for i in infos])

    # -- the outbox ----------------------------------------------------------------------

    def PutJobs(  # noqa: N802
        self, request: keyvault_pb2.PutJobsRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.PutJobsResponse:
        if not request.jobs:
            raise bad("jobs: at least one job is required")
        jobs = self._jobs(request.jobs, self._now())
        with log_context(request_id=self._request_id(context)):
            recorded = self._vault.put_jobs(jobs)
            self._log_jobs(jobs)
        return keyvault_pb2.PutJobsResponse(recorded=recorded)

    def CompleteJob(  # noqa: N802
        self, request: keyvault_pb2.CompleteJobRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.CompleteJobResponse:
        job_id = _job_id(request.job_id)
        completed = self._vault.complete_job(job_id)
        self._log.debug("outbox job completed", extra={"job_id": str(job_id),
                                                       "found": completed})
        return keyvault_pb2.CompleteJobResponse(completed=completed)

    def RescheduleJob(  # noqa: N802
        self, request: keyvault_pb2.RescheduleJobRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.RescheduleJobResponse:
        job_id = _job_id(request.job_id)
        if not request.HasField("next_due_at"):
            raise bad("next_due_at: is required")
        due = convert.datetime_from_timestamp(request.next_due_at, "next_due_at")
        attempts = self._vault.reschedule_job(job_id, due)
        return keyvault_pb2.RescheduleJobResponse(found=attempts is not None,
                                                  attempts=attempts or 0)

    def ListDueJobs(  # noqa: N802
        self, request: keyvault_pb2.ListDueJobsRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.ListDueJobsResponse:
        limit = request.limit or DEFAULT_LIST_LIMIT
        if limit > MAX_DUE_LIMIT:
            raise bad(f"limit: at most {MAX_DUE_LIMIT}, got {limit}")
        kind = checked("kind", job_kind, request.kind) if request.kind else None
        if request.lease_ms > MAX_LEASE_S * 1000:
            raise bad(f"lease_ms: at most {int(MAX_LEASE_S * 1000)}, got {request.lease_ms}")
        due = self._vault.due_jobs(limit, kind, request.lease_ms / 1000)
        return convert.due_jobs_to_proto(due)

    # -- stocks (issue 11) -------------------------------------------------------------

    def StockPut(  # noqa: N802
        self, request: keyvault_pb2.StockPutRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StockPutResponse:
        stock = convert.stock_from_proto(request.stock)
        if not request.keys or len(request.keys) > MAX_BATCH:
            raise bad(f"keys: 1 to {MAX_BATCH} keys per call, got {len(request.keys)}")
        if not request.HasField("expires_at"):
            raise bad("expires_at: is required")
        expires = convert.datetime_from_timestamp(request.expires_at, "expires_at")
        keys = [convert.key_from_proto(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
        stored = self._vault.stock_put(stock, keys, expires)
        self._log.info("stock keys recorded", extra={"stock": str(stock), "count": stored})
        return keyvault_pb2.StockPutResponse(stored=stored)

    def StockSettle(  # noqa: N802
        self, request: keyvault_pb2.StockSettleRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StockSettleResponse:
        ids = key_ids(request.key_ids)
        return keyvault_pb2.StockSettleResponse(
            changed=self._vault.stock_settle(ids, request.ready))

    def StockTake(  # noqa: N802
        self, request: keyvault_pb2.StockTakeRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StockTakeResponse:
        stock = convert.stock_from_proto(request.stock)
        if not 1 <= request.number <= MAX_BATCH:
            raise bad(f"number: 1 to {MAX_BATCH}, got {request.number}")
        if not 1 <= request.size_bits <= convert.MAX_KEY_BITS:
            raise bad(f"size_bits: 1 to {convert.MAX_KEY_BITS}, got {request.size_bits}")
        keys = self._vault.stock_take(stock, request.number, request.size_bits)
        self._log.info("stock keys taken", extra={"stock": str(stock),
                                                  "key_ids": [str(k.key_id) for k in keys]})
        return keyvault_pb2.StockTakeResponse(keys=[
            common_pb2.KeyMaterial(key_id=str(k.key_id), value=k.material.reveal(),
                                   size_bits=k.size_bits) for k in keys])

    def StockList(  # noqa: N802
        self, request: keyvault_pb2.StockListRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StockListResponse:
        return keyvault_pb2.StockListResponse(entries=[
            convert.stock_entry_to_proto(e)
            for e in self._vault.stock_list(request.limit, list(request.states))])


def _job_id(value: str) -> uuid.UUID:
    try:
        return parse_key_id(value)
    except KmstnError:
        raise bad("job_id: not a UUID") from None
