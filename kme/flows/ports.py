"""The ports the flows reach the node's services through.

Small protocols, so the flows run over fakes in unit tests and over the real
clients in the relay process (relay/__main__.py wires them). Every method
raises :class:`kme.errors.KmstnError` with a typed code on failure; no port
returns an HTTP status or a raw body.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from kme.config import QkdLink
from kme.etsi014 import Status
from kme.etsi020 import AckContainer, ExtKeyContainer, VoidContainer
from kme.flows.messages import AckMessage, DeviceKeysNotice
from kme.types import Deadline, Key, KeyGrant, NodeId, OutboxJob, SaeId, StockEntry, StockId

__all__ = ["Device", "Devices", "Hop", "Job", "JobStore", "Outgoing", "RouteLike", "Routes",
           "StockVault", "Vault"]

# What one hop can carry to a neighbour.
Outgoing = ExtKeyContainer | VoidContainer | DeviceKeysNotice | AckMessage


class RouteLike(Protocol):
    @property
    def destination(self) -> NodeId: ...
    @property
    def next_hop(self) -> NodeId | None: ...
    @property
    def next_kind(self) -> str | None: ...


class Routes(Protocol):
    def route_to_node(self, node: str) -> RouteLike: ...
    def node_of_sae(self, sae: str) -> NodeId:
        """The node serving ``sae`` (configured, or learned from link state); UNKNOWN_SAE."""
    def known_saes(self) -> Mapping[SaeId, NodeId]:
        """Every SAE a route is known for, and its node."""


class Vault(Protocol):
    def store(self, grants: Sequence[KeyGrant]) -> None:
        """Store atomically; an identical copy already held or delivered is fine,
        a conflicting one raises KEY_CONFLICT and changes nothing."""

    def void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
             target_sae_ids: Sequence[str], all_confirmation: bool = False,
             upstream: NodeId | None = None) -> list[AckContainer]:
        """ETSI 020 void here; with ``upstream``, only keys that came from it."""


class StockVault(Protocol):
    """The keyvault's key stocks (issue 11; keyvault/stocks.py)."""

    def stock_put(self, stock: StockId, keys: Sequence[Key], expires_at: datetime) -> int: ...
    def stock_settle(self, key_ids: Sequence[uuid.UUID], ready: bool) -> int: ...
    def stock_take(self, stock: StockId, number: int, size_bits: int) -> list[Key]:
        """``number`` ready keys, each handed out once; INSUFFICIENT_KEY if fewer."""
    def stock_list(self, limit: int = 0, states: Sequence[str] = ()) -> list[StockEntry]: ...


# Pending work is the keyvault's outbox job: one type for the concept.
Job = OutboxJob


class JobStore(Protocol):
    """Durable pending work (kept in the keyvault)."""

    def put(self, jobs: Sequence[Job]) -> None: ...
    def done(self, job_id: uuid.UUID) -> None: ...
    def retry_later(self, job_id: uuid.UUID, due: datetime) -> None: ...
    def due(self, limit: int) -> tuple[list[Job], datetime | None]:
        """Jobs due now, oldest first, and when the next other one falls due."""


class Device(Protocol):
    @property
    def link(self) -> QkdLink: ...
    def enc_keys(self, number: int = 1, size: int | None = None, *,
                 reserved_ok: bool = False) -> list[Key]:
        """Keys from this node's side; ``reserved_ok``: they go to the neighbour at the
        other end, so keys it already holds (read ahead) may be used."""
    def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]: ...
    def status(self) -> Status: ...


class Devices(Protocol):
    def toward(self, peer: NodeId) -> Device | None: ...
    def for_link(self, link_id: str) -> Device: ...


class Hop(Protocol):
    """One hop to a neighbour: seal (kmstn) or plain 020 (foreign KMS), send, read the answer."""

    def send(self, peer: NodeId, message: Outgoing, hop: int, deadline: Deadline
             ) -> list[AckContainer]:
        """The neighbour's ack containers (none for an AckMessage); any refusal or
        failure raises its typed KmstnError (relay/outcomes.py is the one table)."""

    def acks_arrived(self, peer: NodeId, acks: Sequence[AckContainer]) -> list[uuid.UUID]:
        """Acks a foreign KMS POSTed to our callback, for a send() waiting on them;
        returns the key IDs nothing was waiting for."""
