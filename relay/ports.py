"""The flows' ports over the node's real services, as the relay process wires them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from keyvault.client import KeyVaultClient, StoreItem
from kme.acks import acks_from_proto
from kme.etsi020 import AckContainer
from kme.flows import Job
from kme.types import KeyGrant, NodeId

__all__ = ["VaultPort"]


class VaultPort:
    """The keyvault as the flows see it: keys, voids and durable jobs."""

    def __init__(self, client: KeyVaultClient) -> None:
        self._client = client
        self._jobs: dict[uuid.UUID, Job] = {}

    def store(self, grants: Sequence[KeyGrant]) -> None:
        self._client.store([StoreItem(g.key, g.master_sae_id, g.allowed_sae_ids,
                                      g.origin_node_id, g.created_at, g.expires_at)
                            for g in grants])

    def void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
             target_sae_ids: Sequence[str], all_confirmation: bool = False,
             upstream: NodeId | None = None) -> list[AckContainer]:
        return acks_from_proto(self._client.void(key_ids, initiator_sae_id, target_sae_ids,
                                                 all_confirmation))

    # Interim, until the keyvault's job table lands: jobs in memory.
    def put(self, jobs: Sequence[Job]) -> None:
        for j in jobs:
            self._jobs[j.id] = j

    def done(self, job_id: uuid.UUID) -> None:
        self._jobs.pop(job_id, None)

    def retry_later(self, job_id: uuid.UUID, due_unix_ms: int, attempts: int) -> None:
        pass

    def due(self, limit: int) -> list[Job]:
        return list(self._jobs.values())[:limit]


