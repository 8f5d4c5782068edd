"""ETSI 014 Key container (clause 4.3) and Key IDs (clause 4.4): keys by ID, both ways."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from kme.errors import KmstnError
from kme.etsi014._common import bad, load_json, shown
from kme.types import Key, SecretBytes, b64decode_strict, parse_key_id

# A dec_keys request naming more IDs than this is refused before any lookup.
MAX_KEY_IDS: Final = 1024


def key_id_of(value: object) -> uuid.UUID:
    try:
        return parse_key_id(value)
    except KmstnError:
        raise bad("key_ID must be a UUID string") from None


def _unique(ids: list[uuid.UUID]) -> list[uuid.UUID]:
    if len(set(ids)) != len(ids):
        raise bad("key_IDs has duplicate entries")
    return ids


def parse_key_ids_query(args: Mapping[str, Sequence[str]], *, lenient: bool = False,
                        max_ids: int = MAX_KEY_IDS) -> list[uuid.UUID]:
    """The GET form of Get key with key IDs (clause 5.3): exactly one ``key_ID``.

    ``lenient``: one or several, repeated or comma-separated, every one read
    (package docstring); at most ``max_ids``, no duplicates.
    """
    extra = sorted(set(args) - {"key_ID"})
    if extra:
        raise bad(f"query parameter {shown(extra[0])} is not allowed: the GET form of "
                  "dec_keys takes key_ID only; POST Key IDs for more")
    values = args.get("key_ID", ())
    if lenient:
        parts = [part for value in values for part in value.split(",")]
        if not parts:
            raise bad("the GET form of dec_keys needs a key_ID")
        if len(parts) > max_ids:
            raise bad(f"more than {max_ids} key_ID values")
        return _unique([key_id_of(part.strip()) for part in parts])
    if len(values) != 1:
        # Spec note section 6: repeated values are refused, never half-read.
        raise bad("the GET form of dec_keys takes exactly one key_ID; POST Key IDs for more")
    return [key_id_of(values[0])]


def parse_key_ids_body(body: bytes, *, max_ids: int = MAX_KEY_IDS,
                       lenient: bool = False) -> list[uuid.UUID]:
    """The POST form of Get key with key IDs: Key IDs of clause 4.4.

    ``lenient``: unknown fields, at the top or in an entry, are ignored.
    """
    obj = load_json(body) if body.strip() else None
    if not isinstance(obj, dict):
        raise bad("the Key IDs body must be a JSON object with key_IDs")
    extra = sorted(set(obj) - {"key_IDs", "key_IDs_extension"})
    if extra and not lenient:
        raise bad(f"unknown field {shown(extra[0])} in Key IDs")
    if not lenient and not isinstance(obj.get("key_IDs_extension", {}), (dict, type(None))):
        raise bad("key_IDs_extension must be an object")
    raw = obj.get("key_IDs")
    if not isinstance(raw, list) or not raw:
        raise bad("key_IDs must be a non-empty array of {\"key_ID\": UUID} objects")
    if len(raw) > max_ids:
        raise bad(f"key_IDs has more than {max_ids} entries")
    ids: list[uuid.UUID] = []
    for item in raw:
        if not isinstance(item, dict) or "key_ID" not in item:
            raise bad("each key_IDs entry must be an object with a key_ID")
        if set(item) - {"key_ID", "key_ID_extension"} and not lenient:
            raise bad("key_IDs entries take only key_ID and key_ID_extension")
        if not lenient and not isinstance(item.get("key_ID_extension", {}),
                                          (dict, type(None))):
            # Clause 4.4: an object (reserved for future use).
            raise bad("key_ID_extension must be an object")
        ids.append(key_id_of(item["key_ID"]))
    return _unique(ids)


def read_key_ids(method: str, args: Mapping[str, Sequence[str]], body: bytes
                 ) -> list[uuid.UUID]:
    """Get key with key IDs (clause 5.3) as the northbound gateway reads it, lenient.

    GET reads ``key_ID`` from the query (one or several); POST reads Key IDs
    from the body, or, with no body, ``key_ID`` from the query; both is 400.
    """
    if method == "GET" or (not body.strip() and args):
        return parse_key_ids_query(args, lenient=True)
    if args:
        raise bad("a POST to dec_keys carries its key IDs in the body or in the query "
                  "string, not in both")
    return parse_key_ids_body(body, lenient=True)


def key_ids_body(key_ids: Iterable[uuid.UUID]) -> dict[str, Any]:
    """Key IDs (clause 4.4) for POST dec_keys."""
    return {"key_IDs": [{"key_ID": str(k)} for k in key_ids]}


def key_container(keys: Sequence[Key]) -> dict[str, Any]:
    """Key container (clause 4.3): ``keys`` (lower case, as the spec's example)."""
    return {"keys": [{"key_ID": str(k.key_id), "key": k.material.b64()} for k in keys]}


def parse_key_container_body(body: bytes, *, number: int | None = None,
                             size: int | None = None) -> list[Key]:
    """Read a Key container from a KME; check count and size when they are known.

    Raises INVALID_ARGUMENT naming what is wrong; the southbound client turns
    that into "the device answered badly" (its public text never includes
    the device's words).
    """
    obj = load_json(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("keys"), list):
        raise bad("Key container has no keys array")
    keys: list[Key] = []
    seen: set[uuid.UUID] = set()
    for item in obj["keys"]:
        if not isinstance(item, dict):
            raise bad("keys[] entries must be objects")
        key_id = key_id_of(item.get("key_ID"))
        if key_id in seen:
            raise bad("Key container repeats a key_ID")
        seen.add(key_id)
        try:
            material = b64decode_strict(item.get("key"))
        except KmstnError:
            raise bad("keys[].key must be standard base64 (RFC 4648)") from None
        if not material:
            raise bad("keys[].key must not be empty")
        bits = len(material) * 8
        if size is not None and (size + 7) // 8 != len(material):
            raise bad(f"a key holds {bits} bits, {size} were asked for")
        keys.append(Key(key_id, SecretBytes(material), size if size is not None else bits))
    if number is not None and len(keys) != number:
        raise bad(f"the Key container holds {len(keys)} keys, {number} were asked for")
    return keys

