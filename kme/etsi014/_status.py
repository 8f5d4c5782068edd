"""ETSI 014 Status (clause 4.1) and the limits it states for one master/slave pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from kme.etsi014._common import bad, load_json

_STATUS_STR_FIELDS: Final = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
_STATUS_INT_FIELDS: Final = ("key_size", "stored_key_count", "max_key_count",
                             "max_key_per_request", "max_key_size", "min_key_size",
                             "max_SAE_ID_count")


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What a KME serves for one master/slave pair (the Status fields that bound requests)."""

    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    max_sae_id_count: int
    # ETSI 014 clause 4.2: a KME that serves whole bytes only answers any
    # other size with 400 "size shall be a multiple of 8".
    bytes_only: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("need 1 <= min_key_size <= key_size <= max_key_size")
        if self.max_key_per_request < 1 or self.max_sae_id_count < 0:
            raise ValueError("need max_key_per_request >= 1 and max_sae_id_count >= 0")


@dataclass(frozen=True, slots=True)
class Status:
    """The Status of clause 4.1: the 11 mandatory fields and the optional extension."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int
    status_extension: dict[str, Any] | None = None

    @classmethod
    def of(cls, *, source_kme_id: str, target_kme_id: str, master_sae_id: str,
           slave_sae_id: str, limits: KeyLimits, stored_key_count: int,
           max_key_count: int) -> Status:
        return cls(source_kme_id, target_kme_id, master_sae_id, slave_sae_id,
                   limits.key_size, stored_key_count, max_key_count,
                   limits.max_key_per_request, limits.max_key_size, limits.min_key_size,
                   limits.max_sae_id_count)

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(self.key_size, self.min_key_size, self.max_key_size,
                         self.max_key_per_request, self.max_sae_id_count)


def status_body(status: Status) -> dict[str, Any]:
    """The Status JSON object (clause 4.1), with the spec's field names."""
    out: dict[str, Any] = {
        "source_KME_ID": status.source_kme_id,
        "target_KME_ID": status.target_kme_id,
        "master_SAE_ID": status.master_sae_id,
        "slave_SAE_ID": status.slave_sae_id,
        "key_size": status.key_size,
        "stored_key_count": status.stored_key_count,
        "max_key_count": status.max_key_count,
        "max_key_per_request": status.max_key_per_request,
        "max_key_size": status.max_key_size,
        "min_key_size": status.min_key_size,
        "max_SAE_ID_count": status.max_sae_id_count,
    }
    if status.status_extension:
        out["status_extension"] = status.status_extension
    return out


def parse_status_body(body: bytes) -> Status:
    """Read a Status (clause 4.1); every one of the 11 fields with its JSON type."""
    obj = load_json(body)
    if not isinstance(obj, dict):
        raise bad("Status must be a JSON object")
    for name in _STATUS_STR_FIELDS:
        if not isinstance(obj.get(name), str):
            raise bad(f"Status field {name} must be a string")
    for name in _STATUS_INT_FIELDS:
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"Status field {name} must be a non-negative integer")
    ext = obj.get("status_extension")
    return Status(
        obj["source_KME_ID"], obj["target_KME_ID"], obj["master_SAE_ID"], obj["slave_SAE_ID"],
        obj["key_size"], obj["stored_key_count"], obj["max_key_count"],
        obj["max_key_per_request"], obj["max_key_size"], obj["min_key_size"],
        obj["max_SAE_ID_count"], ext if isinstance(ext, dict) else None)

