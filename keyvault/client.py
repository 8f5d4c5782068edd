"""Typed client of the KeyVault service, for the other services of a node.

Failures raise :class:`kme.errors.KmstnError` with the code the vault
raised (KEY_NOT_FOUND, PERMISSION_DENIED, KEY_CONFLICT, INVALID_ARGUMENT,
...), via kme.channels.call.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kme.channels import call
from kme.rpc.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc
from kme.types import Key, SecretBytes, parse_key_id

__all__ = ["KeyVaultClient", "StoreItem"]


@dataclass(frozen=True)
class StoreItem:
    """One key to store, and who may take it."""

    key: Key
    master_sae_id: str
    # At least one; each may take the key once (ETSI 014 multicast).
    allowed_sae_ids: tuple[str, ...]
    origin_node_id: str
    created_at: datetime | None = None  # default: now
    expires_at: datetime | None = None  # default: now + keyvault.key_ttl_s


def _timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def _stored_key(item: StoreItem) -> keyvault_pb2.StoredKey:
    msg = keyvault_pb2.StoredKey(
        key=common_pb2.KeyMaterial(key_id=str(item.key.key_id), value=item.key.material.reveal(),
                                   size_bits=item.key.size_bits),
        master_sae_id=item.master_sae_id, allowed_sae_ids=list(item.allowed_sae_ids),
        origin_node_id=item.origin_node_id)
    # getattr: callers may pass any object with the four required fields
    # (kme.flows.StoreRequest has no times).
    created = getattr(item, "created_at", None)
    expires = getattr(item, "expires_at", None)
    if created is not None:
        msg.created_at.CopyFrom(_timestamp(created))
    if expires is not None:
        msg.expires_at.CopyFrom(_timestamp(expires))
    return msg


class KeyVaultClient:
    def __init__(self, channel: grpc.Channel, timeout: float = 5.0) -> None:
        self._stub = keyvault_pb2_grpc.KeyVaultStub(channel)
        self._timeout = timeout

    def store(self, items: Sequence[StoreItem]) -> int:
        """Store a batch atomically; returns how many were new (repeats are fine)."""
        req = keyvault_pb2.StoreRequest(keys=[_stored_key(i) for i in items])
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

    def void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
             target_sae_ids: Sequence[str], all_confirmation: bool = False
             ) -> list[common_pb2.AckContainer]:
        """ETSI 020 void; one ack container per outcome group."""
        req = keyvault_pb2.VoidRequest(key_ids=[str(k) for k in key_ids],
                                       initiator_sae_id=initiator_sae_id,
                                       target_sae_ids=list(target_sae_ids),
                                       all_confirmation=all_confirmation)
        return list(call(self._stub.Void, req, self._timeout).acks)

    def list_pending(self, limit: int = 100, sae_id: str | None = None
                     ) -> list[common_pb2.KeyRecordInfo]:
        """Keys still waiting for at least one SAE, oldest first, without bytes."""
        req = keyvault_pb2.ListPendingRequest(limit=limit, sae_id=sae_id or "")
        return list(call(self._stub.ListPending, req, self._timeout).keys)
