"""The kmstn-only messages the flows send beside ETSI 020's own."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from kme import etsi020
from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer
from kme.types import parse_key_id, sae_id

__all__ = ["AckMessage", "DeviceKeysNotice"]


@dataclass(frozen=True, slots=True)
class AckMessage:
    """ETSI 020 ext_keys/ack: acks POSTed to a neighbour (to its callback URL if given)."""

    acks: tuple[AckContainer, ...]
    callback_url: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceKeysNotice:
    """kmstn-only message (always sealed): keys a QKD neighbour took from our shared device."""

    key_ids: tuple[uuid.UUID, ...]
    size_bits: int
    initiator_sae_id: str
    target_sae_ids: tuple[str, ...]
    link_id: str

    def to_json(self) -> bytes:
        return json.dumps({
            "key_ids": [str(k) for k in self.key_ids], "size_bits": self.size_bits,
            "initiator_sae_id": self.initiator_sae_id,
            "target_sae_ids": list(self.target_sae_ids), "link_id": self.link_id,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> DeviceKeysNotice:
        try:
            obj = json.loads(body)
            ids = tuple(parse_key_id(k) for k in obj["key_ids"])
            size = obj["size_bits"]
            if not ids or len(ids) > etsi020.MAX_KEYS or not isinstance(size, int) or size <= 0:
                raise ValueError
            targets = tuple(sae_id(t) for t in obj["target_sae_ids"])
            if not targets:
                raise ValueError
            return cls(ids, size, sae_id(obj["initiator_sae_id"]), targets, str(obj["link_id"]))
        except (KeyError, TypeError, ValueError, KmstnError):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "malformed device-keys notice",
                             reason="missing_parameters") from None
