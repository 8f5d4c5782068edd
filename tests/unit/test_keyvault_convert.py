"""Hypothesis round trips of the keyvault's domain types through their proto messages."""

from __future__ import annotations

import datetime as dt
import string
import uuid

from hypothesis import given
from hypothesis import strategies as st

from keyvault import convert
from kme.types import (
    DueJobs,
    Key,
    KeyGrant,
    OutboxJob,
    SecretBytes,
    StoreOutcome,
    VoidOutcome,
)

NOW = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
# ETSI 020 5.1 identifiers (kme.types._ID_RE: these characters, or %HH) and
# outbox job kinds; drawn from alphabets, which is much faster than from_regex.
_ID_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
ids = st.lists(st.sampled_from(_ID_CHARS) | st.from_regex(r"\A%[0-9A-Fa-f]{2}\Z"),
               min_size=1, max_size=21).map("".join)
kinds = st.builds(lambda a, b: a + b, st.sampled_from(string.ascii_lowercase),
                  st.text(string.ascii_lowercase + string.digits + "_-", max_size=31))
# Aware UTC datetimes with microseconds, what a proto Timestamp carries exactly.
times = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                     timezones=st.just(dt.UTC))
uuids = st.uuids()


@st.composite
def keys(draw: st.DrawFn) -> Key:
    bits = draw(st.integers(min_value=1, max_value=2048))
    value = bytearray(draw(st.binary(min_size=(bits + 7) // 8, max_size=(bits + 7) // 8)))
    if bits % 8:
        value[-1] &= 0xFF << (8 - bits % 8) & 0xFF
    return Key(draw(uuids), SecretBytes(bytes(value)), bits)


@st.composite
def grants(draw: st.DrawFn) -> KeyGrant:
    created = draw(times)
    # The servicer accepts only keys that expire after now and after creation.
    floor = max(created, NOW)
    expires = floor + draw(st.timedeltas(min_value=dt.timedelta(microseconds=1),
                                         max_value=dt.timedelta(days=3650)))
    return KeyGrant(draw(keys()), draw(ids),
                    tuple(draw(st.lists(ids, min_size=1, max_size=5, unique=True))),
                    draw(ids), draw(st.none() | ids), created_at=created, expires_at=expires)


@st.composite
def jobs(draw: st.DrawFn) -> OutboxJob:
    return OutboxJob(draw(uuids), draw(kinds), draw(ids),
                     SecretBytes(draw(st.binary(max_size=2048))), expires_at=draw(times),
                     next_due_at=draw(st.none() | times),
                     attempts=draw(st.integers(min_value=0, max_value=2**32 - 1)),
                     created_at=draw(st.none() | times))


@given(grants())
def test_key_grant_round_trips(grant: KeyGrant) -> None:
    msg = convert.grant_to_proto(grant)
    assert convert.grant_from_proto(msg, "keys[0]", NOW, 60) == grant
    # And through the wire bytes.
    again = type(msg).FromString(msg.SerializeToString())
    assert convert.grant_from_proto(again, "keys[0]", NOW, 60) == grant


@given(grants())
def test_a_grant_without_times_gets_the_defaults(grant: KeyGrant) -> None:
    bare = KeyGrant(grant.key, grant.master_sae_id, grant.allowed_sae_ids,
                    grant.origin_node_id, grant.upstream_node_id)
    got = convert.grant_from_proto(convert.grant_to_proto(bare), "keys[0]", NOW, 60)
    assert got == KeyGrant(grant.key, grant.master_sae_id, grant.allowed_sae_ids,
                           grant.origin_node_id, grant.upstream_node_id, created_at=NOW,
                           expires_at=NOW + dt.timedelta(seconds=60))


@given(jobs())
def test_outbox_job_round_trips(job: OutboxJob) -> None:
    msg = convert.job_to_proto(job)
    assert convert.job_from_proto(type(msg).FromString(msg.SerializeToString()),
                                  "jobs[0]") == job


@given(st.lists(jobs(), max_size=4), st.none() | times)
def test_due_jobs_round_trip(listed: list[OutboxJob], nxt: dt.datetime | None) -> None:
    due = DueJobs(tuple(listed), nxt)
    assert convert.due_jobs_from_proto(convert.due_jobs_to_proto(due)) == due


@given(st.lists(uuids, max_size=30, unique=True), st.data())
def test_store_and_void_outcomes_round_trip(key_ids: list[uuid.UUID], data: st.DataObject
                                            ) -> None:
    groups = data.draw(st.lists(st.integers(0, 2), min_size=len(key_ids),
                                max_size=len(key_ids)))
    split = [tuple(k for k, g in zip(key_ids, groups, strict=True) if g == n) for n in range(3)]
    store = StoreOutcome(*split)
    assert convert.store_outcome_from_proto(convert.store_outcome_to_proto(store)) == store
    assert convert.store_outcome_to_proto(store).stored == len(split[0])
    void = VoidOutcome(*split)
    assert convert.outcome_from_acks(convert.outcome_to_acks(void, "m", ["s"])) == void
