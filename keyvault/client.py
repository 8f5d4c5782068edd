"""Typed client of the KeyVault service, for the other services of a node.

Every method takes and returns the domain types of :mod:`kme.types`
(:class:`KeyGrant`, :class:`StoreOutcome`, :class:`VoidOutcome`,
:class:`OutboxJob`, :class:`DueJobs`); messages are converted only in
:mod:`keyvault.convert`. Failures raise :class:`kme.errors.KmstnError` with
the code the vault raised (KEY_NOT_FOUND, PERMISSION_DENIED, KEY_CONFLICT,
INVALID_ARGUMENT, UNAVAILABLE, ...), via kme.channels.call.

``store`` (an int) and ``void`` (proto ack containers) keep their old return
types for the callers written before ``store_keys`` and ``void_keys``;
``StoreItem`` is the old name of :class:`KeyGrant`. Both will go once the
callers have switched.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import grpc

from keyvault import convert
from kme.channels import call
from kme.rpc.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc
from kme.types import (
    DueJobs,
    Key,
    KeyGrant,
    OutboxJob,
    SecretBytes,
    StockEntry,
    StockId,
    StoreOutcome,
    VoidOutcome,
    parse_key_id,
)

__all__ = ["KeyVaultClient", "StoreItem"]

# The old name of KeyGrant, kept until every caller uses KeyGrant.
StoreItem = KeyGrant


class KeyVaultClient:
    def __init__(self, channel: grpc.Channel, timeout: float = 5.0) -> None:
        self._stub = keyvault_pb2_grpc.KeyVaultStub(channel)
        self._timeout = timeout

    # -- keys ---------------------------------------------------------------------------

    def store_keys(self, grants: Sequence[KeyGrant], jobs: Sequence[OutboxJob] = ()
                   ) -> StoreOutcome:
        """Store keys, and record ``jobs``, in one transaction: all or nothing.

        Each key is reported newly stored, already held or already delivered
        (see keyvault.store for the rules); answer ETSI 020 ``relayed`` for
        all three. KEY_CONFLICT: a key ID is known with other bytes or
        metadata, or was voided or expired (or a job ID is used for other
        work); nothing was written.
        """
        req = keyvault_pb2.StoreRequest(keys=[convert.grant_to_proto(g) for g in grants],
                                        jobs=[convert.job_to_proto(j) for j in jobs])
        return convert.store_outcome_from_proto(call(self._stub.Store, req, self._timeout))

    def store(self, items: Sequence[KeyGrant]) -> int:
        """Store a batch atomically; how many were new (repeats are fine). Old API."""
        req = keyvault_pb2.StoreRequest(keys=[convert.grant_to_proto(i) for i in items])
        return call(self._stub.Store, req, self._timeout).stored

    def take(self, sae_id: str, master_sae_id: str, key_ids: Sequence[uuid.UUID],
             wait_ms: int = 0) -> list[Key]:
        """Take keys for ``sae_id``: all or nothing, once per SAE; in key_ids order."""
        req = keyvault_pb2.TakeRequest(sae_id=sae_id, master_sae_id=master_sae_id,
                                       key_ids=[str(k) for k in key_ids], wait_ms=wait_ms)
        resp = call(self._stub.Take, req, self._timeout + wait_ms / 1000)
        return [Key(parse_key_id(k.key_id), SecretBytes(k.value), k.size_bits)
                for k in resp.keys]

    def holds(self, sae_id: str, master_sae_id: str, key_ids: Sequence[uuid.UUID]
              ) -> set[uuid.UUID]:
        """Which of ``key_ids`` this SAE could take now (nothing is consumed)."""
        req = keyvault_pb2.HoldsRequest(sae_id=sae_id, master_sae_id=master_sae_id,
                                        key_ids=[str(k) for k in key_ids])
        return {uuid.UUID(k) for k in call(self._stub.Holds, req, self._timeout).key_ids}

    def status(self, master_sae_id: str | None = None, slave_sae_id: str | None = None
               ) -> dict[tuple[str, str], int]:
        """Keys each slave can still take, per (master, slave) pair."""
        req = keyvault_pb2.StatusRequest(master_sae_id=master_sae_id or "",
                                         slave_sae_id=slave_sae_id or "")
        resp = call(self._stub.Status, req, self._timeout)
        return {(p.master_sae_id, p.slave_sae_id): p.count for p in resp.pairs}

    def total_keys(self) -> int:
        """Records held in total (a multicast key counts once)."""
        return call(self._stub.Status, keyvault_pb2.StatusRequest(), self._timeout).total_keys

    def _void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
              target_sae_ids: Sequence[str], all_confirmation: bool,
              upstream_node_id: str | None, jobs: Sequence[OutboxJob]
              ) -> list[common_pb2.AckContainer]:
        req = keyvault_pb2.VoidRequest(key_ids=[str(k) for k in key_ids],
                                       initiator_sae_id=initiator_sae_id,
                                       target_sae_ids=list(target_sae_ids),
                                       all_confirmation=all_confirmation,
                                       upstream_node_id=upstream_node_id or "",
                                       jobs=[convert.job_to_proto(j) for j in jobs])
        return list(call(self._stub.Void, req, self._timeout).acks)

    def void_keys(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
                  target_sae_ids: Sequence[str], *, all_confirmation: bool = False,
                  upstream_node_id: str | None = None, jobs: Sequence[OutboxJob] = ()
                  ) -> VoidOutcome:
        """ETSI 020 void here, and record ``jobs`` in the same transaction.

        ``upstream_node_id``: the neighbour that asked (ETSI 020), or None for
        this node's own void. With it, PERMISSION_DENIED if a named key of
        this initiator and target set arrived from elsewhere or was made here
        (nothing changed, no job recorded); a void of all keys
        (``key_ids`` empty, ``all_confirmation``) touches only its keys.
        """
        return convert.outcome_from_acks(self._void(key_ids, initiator_sae_id, target_sae_ids,
                                                    all_confirmation, upstream_node_id, jobs))

    def void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
             target_sae_ids: Sequence[str], all_confirmation: bool = False, *,
             upstream_node_id: str | None = None) -> list[common_pb2.AckContainer]:
        """ETSI 020 void; one ack container per outcome group. Old API (see void_keys)."""
        return self._void(key_ids, initiator_sae_id, target_sae_ids, all_confirmation,
                          upstream_node_id, ())

    def list_pending(self, limit: int = 100, sae_id: str | None = None
                     ) -> list[common_pb2.KeyRecordInfo]:
        """Keys still waiting for at least one SAE, oldest first, without bytes."""
        req = keyvault_pb2.ListPendingRequest(limit=limit, sae_id=sae_id or "")
        return list(call(self._stub.ListPending, req, self._timeout).keys)

    # -- the outbox ---------------------------------------------------------------------

    def put_jobs(self, jobs: Sequence[OutboxJob]) -> int:
        """Record jobs durably, all or none; how many were new.

        Putting a job again with the same ID and content is fine (counted
        0); the same ID with other content is KEY_CONFLICT.
        """
        req = keyvault_pb2.PutJobsRequest(jobs=[convert.job_to_proto(j) for j in jobs])
        return call(self._stub.PutJobs, req, self._timeout).recorded

    def complete_job(self, job_id: uuid.UUID) -> bool:
        """Delete a job whose work is done; False if it was gone (done, or expired)."""
        req = keyvault_pb2.CompleteJobRequest(job_id=str(job_id))
        return call(self._stub.CompleteJob, req, self._timeout).completed

    def reschedule_job(self, job_id: uuid.UUID, next_due_at: datetime) -> int | None:
        """Count a failed attempt; due again at ``next_due_at``. The attempts so
        far, or None if the job is gone (done, or expired)."""
        req = keyvault_pb2.RescheduleJobRequest(
            job_id=str(job_id), next_due_at=convert.timestamp_from_datetime(next_due_at))
        resp = call(self._stub.RescheduleJob, req, self._timeout)
        return resp.attempts if resp.found else None

    def due_jobs(self, limit: int = 100, *, kind: str | None = None,
                 lease_ms: int = 0) -> DueJobs:
        """Jobs due now, oldest first, with their payloads; and when the next
        other job falls due. ``lease_ms``: also make the returned jobs due
        again only after that long (so a concurrent lister skips them)."""
        req = keyvault_pb2.ListDueJobsRequest(limit=limit, kind=kind or "", lease_ms=lease_ms)
        return convert.due_jobs_from_proto(call(self._stub.ListDueJobs, req, self._timeout))

    # -- stocks (issue 11) -------------------------------------------------------------

    def stock_put(self, stock: StockId, keys: Sequence[Key], expires_at: datetime) -> int:
        """Record a fill's keys as pending in ``stock`` (before the fill leaves)."""
        req = keyvault_pb2.StockPutRequest(
            stock=convert.stock_to_proto(stock), expires_at=convert.timestamp_from_datetime(
                expires_at), keys=[common_pb2.KeyMaterial(
                    key_id=str(k.key_id), value=k.material.reveal(), size_bits=k.size_bits)
                    for k in keys])
        return call(self._stub.StockPut, req, self._timeout).stored

    def stock_settle(self, key_ids: Sequence[uuid.UUID], ready: bool) -> int:
        """Pending keys become ready (``ready``), or keys are deleted."""
        req = keyvault_pb2.StockSettleRequest(key_ids=[str(k) for k in key_ids], ready=ready)
        return call(self._stub.StockSettle, req, self._timeout).changed

    def stock_take(self, stock: StockId, number: int, size_bits: int) -> list[Key]:
        """``number`` ready keys of ``stock``, each handed out once; INSUFFICIENT_KEY if fewer."""
        req = keyvault_pb2.StockTakeRequest(stock=convert.stock_to_proto(stock), number=number,
                                            size_bits=size_bits)
        resp = call(self._stub.StockTake, req, self._timeout)
        return [Key(parse_key_id(k.key_id), SecretBytes(k.value), k.size_bits)
                for k in resp.keys]

    def stock_list(self, limit: int = 0, states: Sequence[str] = ()) -> list[StockEntry]:
        """Stock entries oldest first, without bytes (only ``states`` if given)."""
        resp = call(self._stub.StockList,
                    keyvault_pb2.StockListRequest(limit=limit, states=list(states)),
                    self._timeout)
        return [convert.stock_entry_from_proto(e) for e in resp.entries]
