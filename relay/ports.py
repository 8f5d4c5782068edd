"""The flows' ports over the node's real services, as the relay process wires them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from keyvault.client import KeyVaultClient
from keyvault.convert import outcome_to_acks
from kme.acks import acks_from_proto
from kme.config import QkdLink
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import Status
from kme.etsi020 import AckContainer
from kme.qkd import QkdDeviceClient, QkdDevices
from kme.types import Key, KeyGrant, NodeId, OutboxJob, StockEntry, StockId
from relay.hop import PeerPools
from relay.hopkey import QKD_KEY_BITS
from relay.qkdreserve import ReservedQkdKeys

__all__ = ["FlowDevices", "ReservingDevice", "VaultPort"]


class VaultPort:
    """The keyvault as the flows see it: keys, voids, and the durable jobs (its outbox)."""

    def __init__(self, client: KeyVaultClient) -> None:
        self._client = client

    def store(self, grants: Sequence[KeyGrant]) -> None:
        self._client.store_keys(grants)

    def void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
             target_sae_ids: Sequence[str], all_confirmation: bool = False,
             upstream: NodeId | None = None) -> list[AckContainer]:
        outcome = self._client.void_keys(key_ids, initiator_sae_id, target_sae_ids,
                                         all_confirmation=all_confirmation,
                                         upstream_node_id=upstream)
        return acks_from_proto(outcome_to_acks(outcome, initiator_sae_id, target_sae_ids))

    def put(self, jobs: Sequence[OutboxJob]) -> None:
        self._client.put_jobs(jobs)

    def done(self, job_id: uuid.UUID) -> None:
        self._client.complete_job(job_id)

    def retry_later(self, job_id: uuid.UUID, due: datetime) -> None:
        self._client.reschedule_job(job_id, due)

    def due(self, limit: int) -> tuple[list[OutboxJob], datetime | None]:
        found = self._client.due_jobs(limit)
        return list(found.jobs), found.next_due_at

    # Key stocks (issue 11): kme.flows.ports.StockVault.

    def stock_put(self, stock: StockId, keys: Sequence[Key], expires_at: datetime) -> int:
        return self._client.stock_put(stock, keys, expires_at)

    def stock_settle(self, key_ids: Sequence[uuid.UUID], ready: bool) -> int:
        return self._client.stock_settle(key_ids, ready)

    def stock_take(self, stock: StockId, number: int, size_bits: int) -> list[Key]:
        return self._client.stock_take(stock, number, size_bits)

    def stock_list(self, limit: int = 0, states: Sequence[str] = ()) -> list[StockEntry]:
        return self._client.stock_list(limit, states)


class ReservingDevice:
    """One QKD device as the flows see it, using the keys already held on both sides.

    The relay keeps QKD keys taken ahead and announced to each QKD neighbour
    (relay/qkdreserve.py, for hop keys). Keys for the SAEs of that neighbour
    come from the same reserve when the neighbour is the destination, and the
    neighbour finds the ones it was told about already held; neither side
    waits on its device on the request path. Each key is used once: the
    reserve hands it out once and the neighbour pops it once.
    """

    def __init__(self, client: QkdDeviceClient, peer: NodeId, pools: PeerPools,
                 reserved: ReservedQkdKeys) -> None:
        self._client = client
        self._peer = peer
        self._pools = pools
        self._reserved = reserved

    @property
    def link(self) -> QkdLink:
        return self._client.link

    def status(self) -> Status:
        return self._client.status()

    def enc_keys(self, number: int = 1, size: int | None = None, *,
                 reserved_ok: bool = False) -> list[Key]:
        keys: list[Key] = []
        pool = self._pools.qkd_pool(self._peer) if reserved_ok and (
            size or self.link.key_size) == QKD_KEY_BITS else None
        while pool is not None and len(keys) < number:
            held = pool.take()
            if held is None:
                break
            keys.append(held)
        if len(keys) < number:
            keys += self._client.enc_keys(number - len(keys), size)
        return keys

    def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]:
        found: dict[uuid.UUID, Key] = {}
        for k in key_ids:
            material = self._reserved.take(self._peer, k)
            if material is not None:
                found[k] = Key(k, material, QKD_KEY_BITS)
        missing = [k for k in key_ids if k not in found]
        if missing:
            found.update((k.key_id, k) for k in self._client.dec_keys(missing))
        return [found[k] for k in key_ids]


class FlowDevices:
    """This node's QKD devices for the flows (each a :class:`ReservingDevice`)."""

    def __init__(self, devices: QkdDevices, pools: PeerPools,
                 reserved: ReservedQkdKeys) -> None:
        self._by_link: dict[str, ReservingDevice] = {}
        self._by_peer: dict[NodeId, ReservingDevice] = {}
        for link_id in devices.links:
            client = devices.for_link(link_id)
            peer = client.link.other(devices.node)
            wrapped = ReservingDevice(client, peer, pools, reserved)
            self._by_link[link_id] = wrapped
            self._by_peer[peer] = wrapped

    def toward(self, peer: NodeId) -> ReservingDevice | None:
        return self._by_peer.get(peer)

    def for_link(self, link_id: str) -> ReservingDevice:
        try:
            return self._by_link[link_id]
        except KeyError:
            raise KmstnError(ErrorCode.UNKNOWN_NODE,
                             f"no QKD device on link {link_id!r}") from None
