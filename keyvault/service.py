"""The kme.rpc.v1.KeyVault gRPC servicer: validate proto input, call the Vault, answer.

Every RPC validates its whole request before touching the store, and
raises :class:`KmstnError` (mapped to gRPC status codes in one place,
kme.errors.ErrorInterceptor). Messages name the offending field, e.g.
``keys[3].key.size_bits``; they never carry key bytes.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Final

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from keyvault.store import MAX_WAIT_S, NewRecord, RecordInfo, Vault, VoidOutcome
from kme import metrics
from kme.errors import ErrorCode, KmstnError
from kme.log import log_context
from kme.rpc.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc
from kme.types import Key, SecretBytes, node_id, parse_key_id, sae_id

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "MAX_BATCH",
    "MAX_KEY_BITS",
    "KeyVaultService",
    "outcome_to_acks",
    "record_info_to_proto",
    "stored_key_to_record",
    "timestamp_from_datetime",
]

# Upper bounds that keep one call's work and memory small and predictable.
MAX_BATCH: Final = 4096
MAX_KEY_BITS: Final = 65536
DEFAULT_LIST_LIMIT: Final = 100
MAX_LIST_LIMIT: Final = 10_000


def _bad(message: str) -> KmstnError:
    return KmstnError(ErrorCode.INVALID_ARGUMENT, message)


def _field(what: str, check: Callable[[object], str], value: object) -> str:
    try:
        return check(value)
    except KmstnError as exc:
        raise _bad(f"{what}: {exc.public}") from None


def _key_ids(values: Sequence[str], what: str = "key_ids") -> list[uuid.UUID]:
    if len(values) > MAX_BATCH:
        raise _bad(f"{what}: at most {MAX_BATCH} per call, got {len(values)}")
    out = []
    for i, value in enumerate(values):
        try:
            out.append(parse_key_id(value))
        except KmstnError:
            shown = value if len(value) <= 64 else value[:64] + "..."
            raise _bad(f"{what}[{i}]: not a UUID key_ID: {shown!r}") from None
    return out


def timestamp_from_datetime(when: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def _datetime(ts: Timestamp, what: str) -> dt.datetime:
    try:
        return ts.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise _bad(f"{what}: not a valid timestamp") from None


def stored_key_to_record(msg: keyvault_pb2.StoredKey, where: str, now: dt.datetime,
                         key_ttl_s: float) -> NewRecord:
    """Validate one StoredKey; INVALID_ARGUMENT names the bad field."""
    key_id = _key_ids([msg.key.key_id], f"{where}.key.key_id")[0]
    bits = msg.key.size_bits
    if not 0 < bits <= MAX_KEY_BITS:
        raise _bad(f"{where}.key.size_bits: must be 1 to {MAX_KEY_BITS}, got {bits}")
    value = msg.key.value
    if len(value) != (bits + 7) // 8:
        raise _bad(f"{where}.key.value: {len(value)} bytes do not hold {bits} bits "
                   f"(need {(bits + 7) // 8})")
    if bits % 8 and value[-1] & ((1 << (8 - bits % 8)) - 1):
        # common.proto: pad bits are zero, so one key has one encoding.
        raise _bad(f"{where}.key.value: the {8 - bits % 8} pad bits must be zero")
    master = _field(f"{where}.master_sae_id", sae_id, msg.master_sae_id)
    if not msg.allowed_sae_ids:
        raise _bad(f"{where}.allowed_sae_ids: at least one SAE is required")
    allowed = tuple(_field(f"{where}.allowed_sae_ids[{i}]", sae_id, s)
                    for i, s in enumerate(msg.allowed_sae_ids))
    if len(set(allowed)) != len(allowed):
        raise _bad(f"{where}.allowed_sae_ids: an SAE is listed twice")
    origin = _field(f"{where}.origin_node_id", node_id, msg.origin_node_id)
    created = (_datetime(msg.created_at, f"{where}.created_at") if msg.HasField("created_at")
               else now)
    expires = (_datetime(msg.expires_at, f"{where}.expires_at") if msg.HasField("expires_at")
               else now + dt.timedelta(seconds=key_ttl_s))
    if expires <= now:
        raise _bad(f"{where}.expires_at: is in the past")
    if expires <= created:
        raise _bad(f"{where}.expires_at: must be after created_at")
    return NewRecord(Key(key_id, SecretBytes(value), bits), master, allowed, origin,
                     created, expires)


def record_info_to_proto(info: RecordInfo) -> common_pb2.KeyRecordInfo:
    return common_pb2.KeyRecordInfo(
        key_id=str(info.key_id), size_bits=info.size_bits, master_sae_id=info.master_sae_id,
        allowed_sae_ids=list(info.allowed_sae_ids),
        taken_by_sae_ids=list(info.taken_by_sae_ids), origin_node_id=info.origin_node_id,
        created_at=timestamp_from_datetime(info.created_at),
        expires_at=timestamp_from_datetime(info.expires_at))


def outcome_to_acks(outcome: VoidOutcome, initiator: str, targets: Sequence[str]
                    ) -> list[common_pb2.AckContainer]:
    """One ETSI 020 ack_container per non-empty outcome group (clause 5.2)."""
    groups = (
        (outcome.voided, common_pb2.ACK_STATUS_VOIDED, ""),
        (outcome.failed_to_void, common_pb2.ACK_STATUS_FAILED_TO_VOID,
         "already delivered to an SAE"),
        (outcome.not_present, common_pb2.ACK_STATUS_KEY_NOT_PRESENT,
         "not held here for this SAE set"),
    )
    return [common_pb2.AckContainer(key_ids=[str(k) for k in ids], status=status,
                                    initiator_sae_id=initiator,
                                    target_sae_ids=list(targets), message=message)
            for ids, status, message in groups if ids]


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

    def Store(  # noqa: N802 - gRPC method name
        self, request: keyvault_pb2.StoreRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StoreResponse:
        if not request.keys:
            raise _bad("keys: at least one key is required")
        if len(request.keys) > MAX_BATCH:
            raise _bad(f"keys: at most {MAX_BATCH} per call, got {len(request.keys)}")
        now = self._now()
        records = [stored_key_to_record(k, f"keys[{i}]", now, self._key_ttl_s)
                   for i, k in enumerate(request.keys)]
        with log_context(request_id=self._request_id(context)):
            stored = self._vault.store(records)
            metrics.count_keyvault_keys("stored", stored)
            self._log.debug("keys stored", extra={
                "count": stored, "repeated": len(records) - stored,
                "key_ids": [str(r.key.key_id) for r in records]})
        return keyvault_pb2.StoreResponse(stored=stored)

    def Take(  # noqa: N802
        self, request: keyvault_pb2.TakeRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.TakeResponse:
        sae = _field("sae_id", sae_id, request.sae_id)
        master = _field("master_sae_id", sae_id, request.master_sae_id)
        if not request.key_ids:
            raise _bad("key_ids: at least one key_ID is required")
        ids = _key_ids(request.key_ids)
        if request.wait_ms > MAX_WAIT_S * 1000:
            raise _bad(f"wait_ms: at most {int(MAX_WAIT_S * 1000)}, got {request.wait_ms}")
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
        sae = _field("sae_id", sae_id, request.sae_id)
        master = _field("master_sae_id", sae_id, request.master_sae_id)
        ids = _key_ids(request.key_ids)
        held = self._vault.holds(sae, master, ids)
        # In request order, without repeats.
        return keyvault_pb2.HoldsResponse(
            key_ids=[str(k) for k in dict.fromkeys(ids) if k in held])

    def Status(  # noqa: N802
        self, request: keyvault_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.StatusResponse:
        master = (_field("master_sae_id", sae_id, request.master_sae_id)
                  if request.master_sae_id else None)
        slave = (_field("slave_sae_id", sae_id, request.slave_sae_id)
                 if request.slave_sae_id else None)
        pairs, total = self._vault.status(master, slave)
        return keyvault_pb2.StatusResponse(
            pairs=[keyvault_pb2.PairCount(master_sae_id=m, slave_sae_id=s, count=n)
                   for (m, s), n in pairs.items()],
            total_keys=total)

    def Void(  # noqa: N802
        self, request: keyvault_pb2.VoidRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.VoidResponse:
        ids = _key_ids(request.key_ids)
        initiator = _field("initiator_sae_id", sae_id, request.initiator_sae_id)
        if not request.target_sae_ids:
            raise _bad("target_sae_ids: at least one SAE is required")
        targets = tuple(_field(f"target_sae_ids[{i}]", sae_id, s)
                        for i, s in enumerate(request.target_sae_ids))
        with log_context(request_id=self._request_id(context)):
            outcome = self._vault.void(ids, initiator, targets, request.all_confirmation)
            metrics.count_keyvault_keys("voided", len(outcome.voided))
            self._log.info("void", extra={
                "initiator_sae_id": initiator, "target_sae_ids": list(targets),
                "all": not ids, "voided": [str(k) for k in outcome.voided],
                "failed_to_void": [str(k) for k in outcome.failed_to_void],
                "not_present": [str(k) for k in outcome.not_present]})
        return keyvault_pb2.VoidResponse(acks=outcome_to_acks(outcome, initiator, targets))

    def ListPending(  # noqa: N802
        self, request: keyvault_pb2.ListPendingRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.ListPendingResponse:
        limit = request.limit or DEFAULT_LIST_LIMIT
        if limit > MAX_LIST_LIMIT:
            raise _bad(f"limit: at most {MAX_LIST_LIMIT}, got {limit}")
        sae = _field("sae_id", sae_id, request.sae_id) if request.sae_id else None
        infos = self._vault.list_pending(limit, sae)
        return keyvault_pb2.ListPendingResponse(keys=[record_info_to_proto(i) for i in infos])
