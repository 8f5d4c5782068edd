"""kme.rpc.v1 KeyVault messages <-> the domain types of kme.types, in one place.

Used by the servicer (:mod:`keyvault.service`, which validates everything it
receives) and by the client (:mod:`keyvault.client`). Validation failures
are INVALID_ARGUMENT with a message naming the field, e.g.
``keys[3].key.size_bits``; they never carry key bytes or payloads.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from keyvault.outbox import MAX_PAYLOAD_BYTES
from keyvault.queries import RecordInfo
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import common_pb2, keyvault_pb2
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
    job_kind,
    node_id,
    parse_key_id,
    sae_id,
)

__all__ = [
    "MAX_BATCH",
    "MAX_KEY_BITS",
    "bad",
    "checked",
    "datetime_from_timestamp",
    "due_jobs_from_proto",
    "due_jobs_to_proto",
    "grant_from_proto",
    "grant_to_proto",
    "job_from_proto",
    "job_to_proto",
    "key_from_proto",
    "key_ids",
    "outcome_from_acks",
    "outcome_to_acks",
    "record_info_to_proto",
    "stock_entry_from_proto",
    "stock_entry_to_proto",
    "stock_from_proto",
    "stock_to_proto",
    "store_outcome_from_proto",
    "store_outcome_to_proto",
    "timestamp_from_datetime",
]

# Upper bounds that keep one call's work and memory small and predictable.
MAX_BATCH: Final = 4096
MAX_KEY_BITS: Final = 65536


def bad(message: str) -> KmstnError:
    return KmstnError(ErrorCode.INVALID_ARGUMENT, message)


def checked(what: str, check: Callable[[object], str], value: object) -> str:
    """``check(value)``, with the field's name in front of its complaint."""
    try:
        return check(value)
    except KmstnError as exc:
        raise bad(f"{what}: {exc.public}") from None


def key_ids(values: Sequence[str], what: str = "key_ids") -> list[uuid.UUID]:
    if len(values) > MAX_BATCH:
        raise bad(f"{what}: at most {MAX_BATCH} per call, got {len(values)}")
    out = []
    for i, value in enumerate(values):
        try:
            out.append(parse_key_id(value))
        except KmstnError:
            shown = value if len(value) <= 64 else value[:64] + "..."
            raise bad(f"{what}[{i}]: not a UUID key_ID: {shown!r}") from None
    return out


def timestamp_from_datetime(when: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def datetime_from_timestamp(ts: Timestamp, what: str) -> dt.datetime:
    try:
        return ts.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise bad(f"{what}: not a valid timestamp") from None


# -- keys ---------------------------------------------------------------------------


def grant_to_proto(grant: KeyGrant) -> keyvault_pb2.StoredKey:
    msg = keyvault_pb2.StoredKey(
        key=common_pb2.KeyMaterial(key_id=str(grant.key.key_id),
                                   value=grant.key.material.reveal(),
                                   size_bits=grant.key.size_bits),
        master_sae_id=grant.master_sae_id, allowed_sae_ids=list(grant.allowed_sae_ids),
        origin_node_id=grant.origin_node_id, upstream_node_id=grant.upstream_node_id or "")
    if grant.created_at is not None:
        msg.created_at.CopyFrom(timestamp_from_datetime(grant.created_at))
    if grant.expires_at is not None:
        msg.expires_at.CopyFrom(timestamp_from_datetime(grant.expires_at))
    return msg


def key_from_proto(msg: common_pb2.KeyMaterial, where: str) -> Key:
    """Validate one KeyMaterial (``where`` names it in messages)."""
    key_id = key_ids([msg.key_id], f"{where}.key_id")[0]
    bits = msg.size_bits
    if not 0 < bits <= MAX_KEY_BITS:
        raise bad(f"{where}.size_bits: must be 1 to {MAX_KEY_BITS}, got {bits}")
    value = msg.value
    if len(value) != (bits + 7) // 8:
        raise bad(f"{where}.value: {len(value)} bytes do not hold {bits} bits "
                  f"(need {(bits + 7) // 8})")
    if bits % 8 and value[-1] & ((1 << (8 - bits % 8)) - 1):
        # common.proto: pad bits are zero, so one key has one encoding.
        raise bad(f"{where}.value: the {8 - bits % 8} pad bits must be zero")
    return Key(key_id, SecretBytes(value), bits)


def grant_from_proto(msg: keyvault_pb2.StoredKey, where: str, now: dt.datetime,
                     key_ttl_s: float) -> KeyGrant:
    """Validate one StoredKey and fill in its default times."""
    key = key_from_proto(msg.key, f"{where}.key")
    master = checked(f"{where}.master_sae_id", sae_id, msg.master_sae_id)
    if not msg.allowed_sae_ids:
        raise bad(f"{where}.allowed_sae_ids: at least one SAE is required")
    allowed = tuple(checked(f"{where}.allowed_sae_ids[{i}]", sae_id, s)
                    for i, s in enumerate(msg.allowed_sae_ids))
    if len(set(allowed)) != len(allowed):
        raise bad(f"{where}.allowed_sae_ids: an SAE is listed twice")
    origin = checked(f"{where}.origin_node_id", node_id, msg.origin_node_id)
    upstream = (checked(f"{where}.upstream_node_id", node_id, msg.upstream_node_id)
                if msg.upstream_node_id else None)
    created = (datetime_from_timestamp(msg.created_at, f"{where}.created_at")
               if msg.HasField("created_at") else now)
    expires = (datetime_from_timestamp(msg.expires_at, f"{where}.expires_at")
               if msg.HasField("expires_at") else now + dt.timedelta(seconds=key_ttl_s))
    if expires <= now:
        raise bad(f"{where}.expires_at: is in the past")
    if expires <= created:
        raise bad(f"{where}.expires_at: must be after created_at")
    return KeyGrant(key, master, allowed, origin, upstream, created, expires)


def store_outcome_to_proto(outcome: StoreOutcome) -> keyvault_pb2.StoreResponse:
    return keyvault_pb2.StoreResponse(
        stored=len(outcome.stored), stored_key_ids=[str(k) for k in outcome.stored],
        already_held_key_ids=[str(k) for k in outcome.already_held],
        already_delivered_key_ids=[str(k) for k in outcome.already_delivered])


def store_outcome_from_proto(msg: keyvault_pb2.StoreResponse) -> StoreOutcome:
    return StoreOutcome(tuple(key_ids(msg.stored_key_ids, "stored_key_ids")),
                        tuple(key_ids(msg.already_held_key_ids, "already_held_key_ids")),
                        tuple(key_ids(msg.already_delivered_key_ids,
                                      "already_delivered_key_ids")))


def record_info_to_proto(info: RecordInfo) -> common_pb2.KeyRecordInfo:
    return common_pb2.KeyRecordInfo(
        key_id=str(info.key_id), size_bits=info.size_bits, master_sae_id=info.master_sae_id,
        allowed_sae_ids=list(info.allowed_sae_ids),
        taken_by_sae_ids=list(info.taken_by_sae_ids), origin_node_id=info.origin_node_id,
        created_at=timestamp_from_datetime(info.created_at),
        expires_at=timestamp_from_datetime(info.expires_at),
        upstream_node_id=info.upstream_node_id or "")


# -- voids --------------------------------------------------------------------------

_ACK_GROUPS: Final = (
    (common_pb2.ACK_STATUS_VOIDED, ""),
    (common_pb2.ACK_STATUS_FAILED_TO_VOID, "already delivered to an SAE"),
    (common_pb2.ACK_STATUS_KEY_NOT_PRESENT, "not held here for this SAE set"),
)


def outcome_to_acks(outcome: VoidOutcome, initiator: str, targets: Sequence[str]
                    ) -> list[common_pb2.AckContainer]:
    """One ETSI 020 ack_container per non-empty outcome group (clause 5.2)."""
    groups = zip((outcome.voided, outcome.failed_to_void, outcome.not_present), _ACK_GROUPS,
                 strict=True)
    return [common_pb2.AckContainer(key_ids=[str(k) for k in ids], status=status,
                                    initiator_sae_id=initiator,
                                    target_sae_ids=list(targets), message=message)
            for ids, (status, message) in groups if ids]


def outcome_from_acks(acks: Sequence[common_pb2.AckContainer]) -> VoidOutcome:
    """The inverse of outcome_to_acks (a VoidResponse read by the client)."""
    by_status: dict[int, list[uuid.UUID]] = {status: [] for status, _ in _ACK_GROUPS}
    for i, ack in enumerate(acks):
        if ack.status not in by_status:
            raise bad(f"acks[{i}].status: {ack.status} is not a void outcome")
        by_status[ack.status] += key_ids(ack.key_ids, f"acks[{i}].key_ids")
    voided, failed, absent = (tuple(by_status[status]) for status, _ in _ACK_GROUPS)
    return VoidOutcome(voided, failed, absent)


# -- the outbox ---------------------------------------------------------------------


def job_to_proto(job: OutboxJob) -> keyvault_pb2.OutboxJob:
    msg = keyvault_pb2.OutboxJob(
        job_id=str(job.job_id), kind=job.kind, destination_node_id=job.destination_node_id,
        payload=job.payload.reveal(), attempts=job.attempts,
        expires_at=timestamp_from_datetime(job.expires_at))
    if job.next_due_at is not None:
        msg.next_due_at.CopyFrom(timestamp_from_datetime(job.next_due_at))
    if job.created_at is not None:
        msg.created_at.CopyFrom(timestamp_from_datetime(job.created_at))
    return msg


def job_from_proto(msg: keyvault_pb2.OutboxJob, where: str) -> OutboxJob:
    """Validate one OutboxJob's fields (times are checked against now by the caller)."""
    try:
        job_id = parse_key_id(msg.job_id)
    except KmstnError:
        raise bad(f"{where}.job_id: not a UUID") from None
    kind = checked(f"{where}.kind", job_kind, msg.kind)
    destination = checked(f"{where}.destination_node_id", node_id, msg.destination_node_id)
    if len(msg.payload) > MAX_PAYLOAD_BYTES:
        raise bad(f"{where}.payload: at most {MAX_PAYLOAD_BYTES} bytes, got {len(msg.payload)}")
    if not msg.HasField("expires_at"):
        raise bad(f"{where}.expires_at: is required")
    return OutboxJob(
        job_id, kind, destination, SecretBytes(msg.payload),
        expires_at=datetime_from_timestamp(msg.expires_at, f"{where}.expires_at"),
        next_due_at=(datetime_from_timestamp(msg.next_due_at, f"{where}.next_due_at")
                     if msg.HasField("next_due_at") else None),
        attempts=msg.attempts,
        created_at=(datetime_from_timestamp(msg.created_at, f"{where}.created_at")
                    if msg.HasField("created_at") else None))


def due_jobs_to_proto(due: DueJobs) -> keyvault_pb2.ListDueJobsResponse:
    msg = keyvault_pb2.ListDueJobsResponse(jobs=[job_to_proto(j) for j in due.jobs])
    if due.next_due_at is not None:
        msg.next_due_at.CopyFrom(timestamp_from_datetime(due.next_due_at))
    return msg


def due_jobs_from_proto(msg: keyvault_pb2.ListDueJobsResponse) -> DueJobs:
    return DueJobs(tuple(job_from_proto(j, f"jobs[{i}]") for i, j in enumerate(msg.jobs)),
                   datetime_from_timestamp(msg.next_due_at, "next_due_at")
                   if msg.HasField("next_due_at") else None)


# -- stocks ----------------------------------------------------------------------------------


def stock_to_proto(stock: StockId) -> keyvault_pb2.StockId:
    return keyvault_pb2.StockId(destination_node_id=stock.destination,
                                master_sae_id=stock.master, slave_sae_ids=list(stock.slaves))


def stock_from_proto(msg: keyvault_pb2.StockId, what: str = "stock") -> StockId:
    dest = checked(f"{what}.destination_node_id", node_id, msg.destination_node_id)
    master = checked(f"{what}.master_sae_id", sae_id, msg.master_sae_id)
    if not msg.slave_sae_ids:
        raise bad(f"{what}.slave_sae_ids: at least one slave is required")
    slaves = tuple(checked(f"{what}.slave_sae_ids[{i}]", sae_id, s)
                   for i, s in enumerate(msg.slave_sae_ids))
    return StockId(dest, master, slaves)


def stock_entry_to_proto(e: StockEntry) -> keyvault_pb2.StockEntry:
    return keyvault_pb2.StockEntry(key_id=str(e.key_id), stock=stock_to_proto(e.stock),
                                   size_bits=e.size_bits, state=e.state,
                                   expires_at=timestamp_from_datetime(e.expires_at))


def stock_entry_from_proto(msg: keyvault_pb2.StockEntry) -> StockEntry:
    return StockEntry(parse_key_id(msg.key_id), stock_from_proto(msg.stock), msg.size_bits,
                      msg.state, datetime_from_timestamp(msg.expires_at, "expires_at"))
