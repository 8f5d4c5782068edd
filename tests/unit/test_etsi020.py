"""kme.etsi020: the ack_containers wire form and its limits (spec note 5.2)."""

from __future__ import annotations

import json
import uuid

import pytest

from kme.errors import KmstnError
from kme.etsi020 import MAX_KEYS, AckContainer, acks_json, parse_acks


def ack(n: int, status: str = "voided") -> AckContainer:
    return AckContainer(tuple(uuid.uuid4() for _ in range(n)), status, "sae-m", ("sae-s",))


def test_a_container_of_more_than_1024_keys_goes_out_as_several() -> None:
    big, small = ack(2 * MAX_KEYS + 5), ack(3, "key not present")
    wire = json.loads(acks_json([big, small]))
    assert [len(c["key_id_container"]) for c in wire] == [MAX_KEYS, MAX_KEYS, 5, 3]
    assert all(len(c["key_id_container"]) <= 1024 for c in wire)
    back = parse_acks(acks_json([big, small]))
    assert [k for c in back[:3] for k in c.key_ids] == list(big.key_ids)
    assert {(c.ack_status, c.initiator_sae_id, c.target_sae_ids) for c in back[:3]} == {
        ("voided", "sae-m", ("sae-s",))}
    assert back[3] == small


def test_round_trip_keeps_message_and_extension() -> None:
    a = AckContainer((uuid.uuid4(),), "failed", "sae-m", ("sae-s", "sae-t"), "no route",
                     {"hops": 3})
    assert parse_acks(acks_json([a])) == [a]


def test_an_empty_answer_only_where_allowed() -> None:
    assert parse_acks(b"[]", allow_empty=True) == []
    with pytest.raises(KmstnError) as err:
        parse_acks(b"[]")
    assert "non-empty" in err.value.public
