"""Sealer and Opener in-process: QKD and PQC hops, fallback, binding checks, errors.

The two ends are real Sealer/Opener/SessionStore objects built from real
node files; the only fake is the QKD device pair (an in-memory key store with
ETSI 014 enc_keys/dec_keys semantics), since this is a unit test of the hop
logic. The real-process version is tests/integration/test_relay_process.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kme.config import NodeConfig, load_node_config
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, NodeId, SaeId, SecretBytes
from relay import envelope as env
from relay import kem
from relay.hop import Opener, Sealer
from relay.hopkey import DeviceClient, HopLinks, combine
from relay.kempool import KeyPool
from tests.federation import FederationFiles
from tests.helpers import Pki

A, B, C, D = NodeId("A"), NodeId("B"), NodeId("C"), NodeId("D")


@dataclass
class FakeQkdLink:
    """Both devices of one QKD link: a key issued at one end is fetched once at the other."""

    keys: dict[uuid.UUID, tuple[NodeId, Key]] = field(default_factory=dict)
    fail: ErrorCode | None = None
    enc_calls: int = 0
    dec_calls: int = 0


class FakeDeviceEnd:
    def __init__(self, link: FakeQkdLink, me: NodeId) -> None:
        self.link = link
        self.me = me

    def enc_keys(self, number: int = 1, size: int | None = None) -> list[Key]:
        self.link.enc_calls += 1
        if self.link.fail is not None:
            raise KmstnError(self.link.fail, "device says no")
        bits = size or 256
        out = [Key(uuid.uuid4(), SecretBytes(os.urandom(bits // 8)), bits)
               for _ in range(number)]
        for k in out:
            self.link.keys[k.key_id] = (self.me, k)
        return out

    def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]:
        self.link.dec_calls += 1
        found = []
        for key_id in key_ids:
            entry = self.link.keys.get(key_id)
            if entry is None or entry[0] == self.me:
                raise KmstnError(ErrorCode.KEY_NOT_FOUND, f"key {key_id} not found")
            found.append(entry[1])
        for key_id in key_ids:
            del self.link.keys[key_id]
        return found


class FakeDevices:
    def __init__(self, ends: dict[NodeId, FakeDeviceEnd]) -> None:
        self.ends = ends

    def toward(self, peer: NodeId) -> DeviceClient | None:
        return self.ends.get(peer)


@dataclass
class Node:
    config: NodeConfig
    links: HopLinks
    sessions: kem.SessionStore
    devices: FakeDevices
    opener: Opener


class Federation:
    """A: QKD-only to B, PQC-only to C, QKD and PQC to D; B-C PQC; A-F site link."""

    def __init__(self, root: Path, pki: Pki) -> None:
        fed = FederationFiles(root, pki)
        for n in "ABCD":
            fed.kmstn(n)
        fed.kmstn("F", kind="foreign")
        fed.qkd("A", "B")
        fed.pqc("A", "C")
        fed.qkd("A", "D")
        fed.pqc("A", "D")
        fed.pqc("B", "C")
        fed.site("A", "F")
        # Nothing listens in a unit test: fixed, distinct ports instead of
        # free_port(), which can hand out one port twice across 19 calls.
        port = iter(range(20001, 20100))
        for k in fed.data["kmstn"]:
            for name in ("etsi014_port", "etsi020_port", "relay_port"):
                if name in k:
                    k[name] = next(port)
        for link in fed.data["qkd_link"]:
            link["alice"]["port"], link["bob"]["port"] = next(port), next(port)
        fed.write()
        self.qkd = {frozenset("AB"): FakeQkdLink(), frozenset("AD"): FakeQkdLink()}
        self.nodes: dict[NodeId, Node] = {}
        for n in "ABCD":
            config = load_node_config(fed.node_file(n))
            ends = {NodeId(other): FakeDeviceEnd(link, NodeId(n))
                    for pair, link in self.qkd.items() if n in pair
                    for other in pair if other != n}
            links = HopLinks(config)
            sessions = kem.SessionStore(300)
            devices = FakeDevices(ends)
            self.nodes[NodeId(n)] = Node(config, links, sessions, devices,
                                         Opener(links, sessions, devices))
        self.pools: dict[NodeId, KeyPool] = {}

    def pool(self, sender: NodeId, peer: NodeId) -> KeyPool:
        if (sender, peer) not in self.pools:  # type: ignore[comparison-overlap]
            # Looked up at each fetch, so a test can replace (restart) a node.
            self.pools[(sender, peer)] = KeyPool(  # type: ignore[index]
                peer, lambda n: self.nodes[peer].sessions.issue(sender, n), 4, executor=None)
        return self.pools[(sender, peer)]  # type: ignore[index]

    def sealer(self, sender: NodeId, **kwargs: object) -> Sealer:
        node = self.nodes[sender]
        return Sealer(node.links, lambda peer: self.pool(sender, peer), node.devices,
                      **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """This module's own CA: the session-wide one caches certificates by name,
    and other tests issue "A", "B", ... for other addresses."""
    return Pki(tmp_path_factory.mktemp("relay-hop-pki"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relayhop")


@pytest.fixture
def fed(files: Path, pki: Pki) -> Federation:
    return Federation(files / uuid.uuid4().hex[:8], pki)


def _code(fn: object, *args: object) -> KmstnError:
    with pytest.raises(KmstnError) as err:
        fn(*args)  # type: ignore[operator]
    return err.value


BODY = b'{"key_container":{"keys":[{"key_ID":"k","key":"c2VjcmV0IGtleQ=="}]}}'


def test_pqc_hop(fed: Federation) -> None:
    sealed = fed.sealer(A).seal_detailed("C", "ext_keys", BODY, 1)
    doc = json.loads(sealed.envelope)
    assert sealed.kind == "pqc" and doc["alg"] == env.ALG_PQC
    assert "qkd_key_id" not in doc and "sae" not in doc and "kem_ciphertext" in doc
    assert (doc["src"], doc["dst"], doc["hop"], doc["type"]) == ("A", "C", 1, "ext_keys")
    result = fed.nodes[C].opener.open("A", "ext_keys", sealed.envelope)
    assert (result.body, result.hop, result.kind, result.session) == (BODY, 1, "pqc",
                                                                     sealed.session)
    assert BODY not in sealed.envelope


def test_qkd_hop_uses_qkd_xor_kem(fed: Federation) -> None:
    link = fed.qkd[frozenset("AB")]
    sealed = fed.sealer(A).seal_detailed("B", "ext_keys", BODY, 3)
    doc = json.loads(sealed.envelope)
    assert sealed.kind == "qkd" and doc["alg"] == env.ALG_QKD
    assert doc["sae"] == "A"  # the sender's device SAE ID (topology default)
    key_id = uuid.UUID(doc["qkd_key_id"])
    qkd_key = link.keys[key_id][1].material
    # The message key is the XOR: the KEM secret alone does not open it.
    result = fed.nodes[B].opener.open("A", "ext_keys", sealed.envelope)
    assert (result.body, result.kind, result.hop) == (BODY, "qkd", 3)
    assert key_id not in link.keys  # fetched once by B's side
    assert len(qkd_key) == 32


def test_qkd_key_alone_or_kem_alone_does_not_open(fed: Federation) -> None:
    """Build the envelope by hand to check that both halves of the key are needed."""
    store = fed.nodes[B].sessions
    (one_time,) = store.issue(A, 1)
    kem_secret, ct = kem.encapsulate(kem.load_public_key(one_time.public_key))
    qkd = FakeDeviceEnd(fed.qkd[frozenset("AB")], A).enc_keys(1, 256)[0]
    header = env.Header(alg=env.ALG_QKD, session=one_time.session, src=A, dst=B, hop=1,
                        type="ext_keys", kem_ciphertext=ct, qkd_key_id=qkd.key_id,
                        sae=SaeId("A"))
    for wrong in (kem_secret, qkd.material):
        (one_time,) = store.issue(A, 1)
        kem_secret2, ct2 = kem.encapsulate(kem.load_public_key(one_time.public_key))
        qkd2 = FakeDeviceEnd(fed.qkd[frozenset("AB")], A).enc_keys(1, 256)[0]
        h2 = env.Header(alg=env.ALG_QKD, session=one_time.session, src=A, dst=B, hop=1,
                        type="ext_keys", kem_ciphertext=ct2, qkd_key_id=qkd2.key_id,
                        sae=SaeId("A"))
        half = kem_secret2 if wrong is kem_secret else qkd2.material
        data = env.seal(h2, half, BODY, os.urandom(12))
        assert _code(fed.nodes[B].opener.open, "A", "ext_keys", data).code is ErrorCode.TAMPERED
    data = env.seal(header, combine(kem_secret, qkd.material), BODY, os.urandom(12))
    assert fed.nodes[B].opener.open("A", "ext_keys", data).body == BODY


def test_qkd_and_pqc_pair_prefers_qkd_and_falls_back(fed: Federation) -> None:
    link = fed.qkd[frozenset("AD")]
    sealer = fed.sealer(A)
    assert sealer.seal_detailed("D", "ext_keys", BODY, 1).kind == "qkd"
    for code in (ErrorCode.UNAVAILABLE, ErrorCode.INSUFFICIENT_KEY, ErrorCode.TIMEOUT):
        link.fail = code
        sealed = sealer.seal_detailed("D", "ext_keys", BODY, 1)
        assert sealed.kind == "pqc"
        assert fed.nodes[D].opener.open("A", "ext_keys", sealed.envelope).kind == "pqc"
    # Other device errors are not a reason to drop QKD.
    link.fail = ErrorCode.PERMISSION_DENIED
    assert _code(sealer.seal, "D", "ext_keys", BODY, 1).code is ErrorCode.PERMISSION_DENIED


@pytest.mark.parametrize("message_type", ["void", "ack", "device_keys"])
def test_keyless_messages_spend_no_qkd_key(fed: Federation, message_type: str) -> None:
    """Messages without key material are sealed with ML-KEM alone, even on a QKD-only link."""
    link = fed.qkd[frozenset("AB")]
    before = len(link.keys)
    sealed = fed.sealer(A).seal_detailed("B", message_type, BODY, 1)
    doc = json.loads(sealed.envelope)
    assert sealed.kind == "pqc" and doc["alg"] == env.ALG_PQC and "qkd_key_id" not in doc
    assert len(link.keys) == before  # no QKD key was taken
    assert fed.nodes[B].opener.open("A", message_type, sealed.envelope).body == BODY


def test_key_carrying_message_cannot_go_kem_only_over_a_qkd_only_link(fed: Federation) -> None:
    """An ext_keys sealed with ML-KEM alone toward a QKD-only neighbour is refused."""
    store = fed.nodes[B].sessions
    (one_time,) = store.issue(A, 1)
    kem_secret, ct = kem.encapsulate(kem.load_public_key(one_time.public_key))
    header = env.Header(alg=env.ALG_PQC, session=one_time.session, src=A, dst=B, hop=1,
                        type="ext_keys", kem_ciphertext=ct)
    data = env.seal(header, kem_secret, BODY, os.urandom(12))
    err = _code(fed.nodes[B].opener.open, "A", "ext_keys", data)
    assert err.code is ErrorCode.TAMPERED and "no PQC link" in err.public


def test_qkd_only_pair_never_falls_back(fed: Federation) -> None:
    fed.qkd[frozenset("AB")].fail = ErrorCode.UNAVAILABLE
    assert _code(fed.sealer(A).seal, "B", "ext_keys", BODY, 1).code is ErrorCode.UNAVAILABLE


def test_replay_is_rejected(fed: Federation) -> None:
    for peer in ("B", "C"):
        data = fed.sealer(A).seal(peer, "ext_keys", BODY, 1)
        fed.nodes[NodeId(peer)].opener.open("A", "ext_keys", data)
        err = _code(fed.nodes[NodeId(peer)].opener.open, "A", "ext_keys", data)
        assert err.code is ErrorCode.UNKNOWN_SESSION and "already used" in err.public


def test_redirect_and_endpoint_checks_do_not_burn_the_session(fed: Federation) -> None:
    data = fed.sealer(A).seal("B", "ext_keys", BODY, 1)
    # Presented to C as if from A: not addressed to C.
    err = _code(fed.nodes[C].opener.open, "A", "ext_keys", data)
    assert err.code is ErrorCode.TAMPERED and "addressed to B" in err.public
    # Presented to B as if from C (B's other neighbour): wrong source.
    err = _code(fed.nodes[B].opener.open, "C", "ext_keys", data)
    assert err.code is ErrorCode.TAMPERED and "claims source A" in err.public
    # Presented at the void endpoint.
    err = _code(fed.nodes[B].opener.open, "A", "void", data)
    assert err.code is ErrorCode.TAMPERED and "sealed for ext_keys" in err.public
    # Not a neighbour at all.
    assert _code(fed.nodes[B].opener.open, "D", "ext_keys", data).code is ErrorCode.UNKNOWN_NODE
    assert fed.nodes[B].opener.open("A", "ext_keys", data).body == BODY


def _hand_sealed(fed: Federation, alg: str, sae: str | None) -> bytes:
    store = fed.nodes[B].sessions
    (one_time,) = store.issue(A, 1)
    kem_secret, ct = kem.encapsulate(kem.load_public_key(one_time.public_key))
    qkd = None
    if alg == env.ALG_QKD:
        qkd = FakeDeviceEnd(fed.qkd[frozenset("AB")], A).enc_keys(1, 256)[0]
    header = env.Header(alg=alg, session=one_time.session, src=A, dst=B, hop=1,
                        type="ext_keys", kem_ciphertext=ct,
                        qkd_key_id=qkd.key_id if qkd else None,
                        sae=SaeId(sae) if sae else None)
    key = combine(kem_secret, qkd.material if qkd else None)
    return env.seal(header, key, BODY, os.urandom(12))


def test_sae_must_be_the_senders_device(fed: Federation) -> None:
    data = _hand_sealed(fed, env.ALG_QKD, "someone-else")
    link = fed.qkd[frozenset("AB")]
    err = _code(fed.nodes[B].opener.open, "A", "ext_keys", data)
    assert err.code is ErrorCode.TAMPERED and "not the QKD device of A" in err.public
    assert link.dec_calls == 0  # refused before asking the device
    assert fed.nodes[B].sessions.outstanding(A) == 1  # and before burning the session


def test_kem_only_on_a_qkd_only_pair_is_a_downgrade(fed: Federation) -> None:
    data = _hand_sealed(fed, env.ALG_PQC, None)
    err = _code(fed.nodes[B].opener.open, "A", "ext_keys", data)
    assert err.code is ErrorCode.TAMPERED and "no PQC link" in err.public
    data = fed.sealer(A).seal("C", "ext_keys", BODY, 1)
    doc = json.loads(data)
    doc.update(alg=env.ALG_QKD, qkd_key_id=str(uuid.uuid4()), sae="A")
    err = _code(fed.nodes[C].opener.open, "A", "ext_keys", json.dumps(doc).encode())
    assert err.code is ErrorCode.TAMPERED and "no QKD link" in err.public


def test_qkd_key_missing_at_the_receiver(fed: Federation) -> None:
    link = fed.qkd[frozenset("AB")]
    data = fed.sealer(A).seal("B", "ext_keys", BODY, 1)
    link.keys.clear()  # the receiving device does not have the key
    err = _code(fed.nodes[B].opener.open, "A", "ext_keys", data)
    assert err.code is ErrorCode.KEY_NOT_FOUND
    # The session was spent by that attempt.
    assert _code(fed.nodes[B].opener.open, "A", "ext_keys", data).code is \
        ErrorCode.UNKNOWN_SESSION


def test_tampered_ciphertext_burns_the_session(fed: Federation) -> None:
    data = fed.sealer(A).seal("C", "ext_keys", BODY, 1)
    doc = json.loads(data)
    raw = bytearray(base64.b64decode(doc["ciphertext"]))
    raw[0] ^= 1
    doc["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    tampered = json.dumps(doc).encode()
    assert _code(fed.nodes[C].opener.open, "A", "ext_keys", tampered).code is ErrorCode.TAMPERED
    assert _code(fed.nodes[C].opener.open, "A", "ext_keys", data).code is \
        ErrorCode.UNKNOWN_SESSION


def test_explicit_exchange(fed: Federation) -> None:
    calls: list[uuid.UUID] = []

    def encapsulated(peer: NodeId, session: uuid.UUID, ct: bytes) -> None:
        calls.append(session)
        fed.nodes[peer].sessions.exchange(A, session, ct)

    sealer = fed.sealer(A, exchange="explicit", encapsulated=encapsulated)
    for peer in (B, C):
        sealed = sealer.seal_detailed(peer, "ext_keys", BODY, 2)
        assert "kem_ciphertext" not in json.loads(sealed.envelope)
        assert calls[-1] == sealed.session
        assert fed.nodes[peer].opener.open("A", "ext_keys", sealed.envelope).body == BODY
        assert _code(fed.nodes[peer].opener.open, "A", "ext_keys", sealed.envelope).code is \
            ErrorCode.UNKNOWN_SESSION
    with pytest.raises(ValueError):
        fed.sealer(A, exchange="explicit", encapsulated=None)


def test_discard_keys_after_a_receiver_restart(fed: Federation) -> None:
    sealer = fed.sealer(A)
    sealer.seal("C", "ext_keys", BODY, 1)  # fills A's pool for C
    restarted = kem.SessionStore(300)  # C restarts: its sessions are gone
    fed.nodes[C] = Node(fed.nodes[C].config, fed.nodes[C].links, restarted,
                        fed.nodes[C].devices,
                        Opener(fed.nodes[C].links, restarted, fed.nodes[C].devices))
    stale = sealer.seal("C", "ext_keys", BODY, 1)
    err = _code(fed.nodes[C].opener.open, "A", "ext_keys", stale)
    assert err.code is ErrorCode.UNKNOWN_SESSION
    sealer.discard_keys("C")
    fresh = sealer.seal("C", "ext_keys", BODY, 1)
    assert fed.nodes[C].opener.open("A", "ext_keys", fresh).body == BODY


def test_seal_argument_checks(fed: Federation) -> None:
    sealer = fed.sealer(A)
    assert _code(sealer.seal, "C", "keys", BODY, 1).code is ErrorCode.INVALID_ARGUMENT
    assert _code(sealer.seal, "C", "ext_keys", BODY, 0).code is ErrorCode.INVALID_ARGUMENT
    assert _code(sealer.seal, "F", "ext_keys", BODY, 1).code is ErrorCode.UNKNOWN_NODE
    assert _code(sealer.seal, "Z", "ext_keys", BODY, 1).code is ErrorCode.UNKNOWN_NODE
    assert _code(sealer.seal, "A", "ext_keys", BODY, 1).code is ErrorCode.UNKNOWN_NODE


def test_logs_name_sessions_but_hold_no_secrets(fed: Federation,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    link = fed.qkd[frozenset("AB")]
    seen_keys: list[bytes] = []
    sessions = []
    for _ in range(5):
        sealed = fed.sealer(A).seal_detailed("B", "ext_keys", BODY, 1)
        doc = json.loads(sealed.envelope)
        seen_keys.append(link.keys[uuid.UUID(doc["qkd_key_id"])][1].material.reveal())
        fed.nodes[B].opener.open("A", "ext_keys", sealed.envelope)
        sessions.append(str(sealed.session))
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert [r.session for r in caplog.records if r.msg == "sealed"] == sessions  # type: ignore[attr-defined]
    for secret in [*seen_keys, BODY, b"c2VjcmV0IGtleQ=="]:
        for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
            assert form not in text


# -- Hypothesis at the hop level ---------------------------------------------------------


@pytest.fixture(scope="module")
def shared_fed(files: Path, pki: Pki) -> Federation:
    return Federation(files / "shared", pki)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(body=st.binary(max_size=2048), peer=st.sampled_from(["B", "C", "D"]),
       typ=st.sampled_from(env.MESSAGE_TYPES), hop=st.integers(1, 2**32 - 1))
def test_round_trip_any_message_any_hop(shared_fed: Federation, body: bytes, peer: str,
                                        typ: str, hop: int) -> None:
    sealed = shared_fed.sealer(A).seal_detailed(peer, typ, body, hop)
    result = shared_fed.nodes[NodeId(peer)].opener.open("A", typ, sealed.envelope)
    assert (result.body, result.hop, result.message_type) == (body, hop, typ)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(peer=st.sampled_from(["B", "C"]), data=st.data())
def test_any_single_bit_flip_is_rejected_by_the_receiver(shared_fed: Federation, peer: str,
                                                         data: st.DataObject) -> None:
    sealed = shared_fed.sealer(A).seal(peer, "ext_keys", BODY, 1)
    position = data.draw(st.integers(0, len(sealed) * 8 - 1))
    flipped = bytearray(sealed)
    flipped[position // 8] ^= 1 << (position % 8)
    with pytest.raises(KmstnError) as err:
        shared_fed.nodes[NodeId(peer)].opener.open("A", "ext_keys", bytes(flipped))
    assert err.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.TAMPERED,
                              ErrorCode.UNKNOWN_SESSION, ErrorCode.KEY_NOT_FOUND)
