"""Signed link state: forged, replayed and tampered records are refused; routes use only
links both ends announce; origination follows capacity without flapping; flooding over
real engines converges; hellos decide liveness and syncs."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import NameOID

from kme.config import LinkStateSettings, Topology
from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId
from lab.pki import LinkStateAuthority
from routing.adjacency import Adjacencies
from routing.engine import LinkStateEngine, Sends
from routing.graph import RoutingTable
from routing.lsdb import Database, learned_graph
from routing.origin import DeviceReading, LocalLink, Originator
from routing.records import (
    AnnouncedLink,
    Record,
    Signed,
    Signer,
    Verifier,
    load_signer,
    load_trust,
)

FED = "test-federation"
NOW = 1_900_000_000_000
SETTINGS = LinkStateSettings(key=Path("-"), cert=Path("-"), ca=Path("-"))


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> LinkStateAuthority:
    return LinkStateAuthority.create(tmp_path_factory.mktemp("lsca"))


@pytest.fixture(scope="module")
def signers(authority: LinkStateAuthority) -> dict[str, Signer]:
    out = {}
    for n in ("A", "B", "C", "M"):
        issued = authority.issue(n)
        out[n] = load_signer(issued.key, issued.cert)
    return out


@pytest.fixture
def verifier(authority: LinkStateAuthority) -> Verifier:
    return Verifier(load_trust(authority.cert_path), FED)


def link(lid: str, to: str, up: bool = True, cost: float = 1.0, kind: str = "pqc"
         ) -> AnnouncedLink:
    return AnnouncedLink(lid, NodeId(to), kind, up, cost, cost)  # type: ignore[arg-type]


def record(origin: str, seq: int, *links: AnnouncedLink, saes: tuple[str, ...] = (),
           at: int = NOW) -> Record:
    return Record(NodeId(origin), seq, at, 300, FED, tuple(SaeId(s) for s in saes), links)


def line_records(signers: dict[str, Signer], seq: int = 1) -> dict[str, Signed]:
    """A --L1-- B --L2-- C, each end announcing its links up."""
    return {
        "A": signers["A"].sign(record("A", seq, link("L1", "B"), saes=("sa",))),
        "B": signers["B"].sign(record("B", seq, link("L1", "A"), link("L2", "C"), saes=("sb",))),
        "C": signers["C"].sign(record("C", seq, link("L2", "B"), saes=("sc",))),
    }


def database(verifier: Verifier, me: str = "A") -> Database:
    return Database(NodeId(me), verifier, now_ms=lambda: NOW + 1000)


def routes(db: Database) -> RoutingTable:
    table = RoutingTable(Topology(Path("-"), FED, 256, {}, (), {}), db.me)
    table.learn(*learned_graph(db))
    return table


# -- verification ---------------------------------------------------------------------------


def test_a_record_signed_by_its_origin_is_kept_and_routed(verifier: Verifier,
                                                         signers: dict[str, Signer]) -> None:
    db = database(verifier)
    for signed in line_records(signers).values():
        assert db.install(signed, NodeId("B")).installed
    entry = db.get("C")
    assert entry is not None and entry.received_from == "B"
    assert entry.verified.signer.startswith("ML-DSA-65, certificate CN=C issued by")
    table = routes(db)
    assert table.route_to_sae("sc").path == ("A", "B", "C")
    assert table.node_of_sae("sb") == "B"
    assert db.refusals() == []


def _other_ca_signer(node: str, same_name: bool) -> Signer:
    """A signer whose certificate comes from a CA the federation does not pin."""
    ca_key = mldsa.MLDSA65PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         "kmstn link-state CA" if same_name else "evil CA")])
    key = mldsa.MLDSA65PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(name).public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(ca_key, None))
    return Signer(key, cert)


def test_forged_records_are_refused_and_never_used(verifier: Verifier,
                                                   signers: dict[str, Signer]) -> None:
    db = database(verifier)
    for signed in line_records(signers).values():
        db.install(signed, NodeId("B"))
    # M wants traffic for C: a record "of C" claiming a cheap direct link to A.
    claim = record("C", 5, link("L2", "B"), link("EVIL", "A", cost=0.001))
    by_m = signers["M"].sign(claim)
    forgeries = {
        # M's own key and certificate, claiming to be C.
        "signed by M, claims origin C": by_m,
        # M's signature carried with C's real certificate.
        "bad signature": Signed(by_m.record, by_m.signature, line_records(signers)["C"]
                                .certificate),
        # A certificate for C from a CA nobody pinned, with the pinned CA's name.
        "certificate signature does not verify with the link-state CA":
            _other_ca_signer("C", same_name=True).sign(claim),
        "certificate not issued by the link-state CA":
            _other_ca_signer("C", same_name=False).sign(claim),
    }
    for why, forged in forgeries.items():
        outcome = db.install(forged, NodeId("B"))
        assert not outcome.installed and outcome.forged
        assert outcome.reason == why
    assert {(r.from_node, r.origin, r.sequence, r.reason) for r in db.refusals()} == {
        ("B", "C", 5, why) for why in forgeries}
    # Nothing of any forgery is held or routed over.
    held = db.get("C")
    assert held is not None and held.verified.record.sequence == 1
    assert db.link("EVIL") is None
    assert routes(db).route_to_node("C").path == ("A", "B", "C")


def test_a_link_only_forged_records_claim_is_never_routed_over(
        verifier: Verifier, signers: dict[str, Signer]) -> None:
    """Even with both ends of a link "announced", by forgeries, the link is not used;
    and a link only one genuine record claims is known but down."""
    db = database(verifier)
    for signed in line_records(signers).values():
        db.install(signed, NodeId("B"))
    evil_c = _other_ca_signer("C", same_name=True).sign(
        record("C", 9, link("L2", "B"), link("SHORT", "A", cost=0.01)))
    evil_a = _other_ca_signer("A", same_name=True).sign(
        record("A", 9, link("L1", "B"), link("SHORT", "C", cost=0.01)))
    assert not db.install(evil_c, NodeId("B")).installed
    assert not db.install(evil_a, NodeId("B")).installed
    table = routes(db)
    assert table.route_to_node("C").path == ("A", "B", "C")
    assert "SHORT" not in {s.link.id for s in table.links()[1]}
    # One genuine end alone (a misconfigured or dishonest C): known, down, not routed.
    one_sided = signers["C"].sign(record("C", 10, link("L2", "B"), link("SHORT", "A", cost=0.01),
                                         saes=("sc",)))
    assert db.install(one_sided, NodeId("B")).installed
    learned = db.link("SHORT")
    assert learned is not None and not learned.up
    table = routes(db)
    assert table.route_to_node("C").path == ("A", "B", "C")
    assert {s.link.id: s.up for s in table.links()[1]}["SHORT"] is False


def test_tampered_records_are_refused(verifier: Verifier, signers: dict[str, Signer]) -> None:
    db = database(verifier)
    good = line_records(signers)["B"]
    body = bytearray(good.record)
    body[-3] ^= 0x01  # one bit of the signed bytes
    sig = bytearray(good.signature)
    sig[100] ^= 0x80
    cert = bytearray(good.certificate)
    cert[len(cert) // 2] ^= 0x01
    cases = [(Signed(bytes(body), good.signature, good.certificate), {"bad signature"}),
             (Signed(good.record, bytes(sig), good.certificate), {"bad signature"}),
             # Whichever byte: the certificate no longer parses, or its CA signature fails.
             (Signed(good.record, good.signature, bytes(cert)),
              {"certificate does not parse",
               "certificate signature does not verify with the link-state CA"}),
             (Signed(good.record, good.signature, b""), {"certificate does not parse"})]
    for tampered, why in cases:
        outcome = db.install(tampered, NodeId("C"))
        assert not outcome.installed and outcome.forged, outcome
        assert outcome.reason in why
    assert db.get("B") is None
    assert db.install(good, NodeId("C")).installed


def test_replayed_and_stale_records_are_refused(verifier: Verifier,
                                                signers: dict[str, Signer]) -> None:
    db = database(verifier)
    old = signers["B"].sign(record("B", 1, link("L1", "A"), link("L2", "C")))
    new = signers["B"].sign(record("B", 2, link("L1", "A"), link("L2", "C", up=False)))
    assert db.install(new, NodeId("C")).installed
    replay = db.install(old, NodeId("C"))
    assert not replay.installed and not replay.forged
    assert replay.reason == "replayed: sequence 1 not above 2 held"
    assert replay.newer_held == new  # the sender is sent the newer copy back
    assert db.install(new, NodeId("A")).reason == "duplicate"
    assert [(r.from_node, r.origin, r.sequence, r.reason) for r in db.refusals()] == [
        ("C", "B", 1, "replayed: sequence 1 not above 2 held")]
    # A record past its lifetime, or signed far in the future, is not kept either.
    dead = signers["C"].sign(record("C", 3, link("L2", "B"), at=NOW - 301_000))
    assert db.install(dead, NodeId("B")).reason == "expired"
    ahead = signers["C"].sign(record("C", 4, link("L2", "B"), at=NOW + 3_600_000))
    assert db.install(ahead, NodeId("B")).reason == "from the future"
    assert db.get("C") is None


def test_records_of_another_federation_or_with_bad_claims_are_refused(
        verifier: Verifier, signers: dict[str, Signer]) -> None:
    db = database(verifier)
    other = dataclasses.replace(record("A", 1, link("L1", "B")), federation="elsewhere")
    assert db.install(signers["A"].sign(other), None).reason == "record of federation 'elsewhere'"
    twice = record("A", 2, link("L1", "B"), link("L1", "C"))
    assert db.install(signers["A"].sign(twice), None).reason == "record names link 'L1' twice"
    bad_cost = record("A", 3, link("L1", "B", cost=-1.0))
    assert db.install(signers["A"].sign(bad_cost), None).reason == \
        "record holds a malformed claim"


# -- engines flooding to each other -------------------------------------------------------


class Net:
    """A few real engines wired by an in-memory transport (what routing.simulate does)."""

    def __init__(self, verifier: Verifier, signers: dict[str, Signer],
                 edges: list[tuple[str, str]], settings: LinkStateSettings = SETTINGS) -> None:
        self.clock = NOW
        self.edges = {frozenset(e) for e in edges}
        self.engines: dict[str, LinkStateEngine] = {}
        nodes = sorted({n for e in edges for n in e})
        for n in nodes:
            links = tuple(LocalLink(f"L-{min(n, o)}-{max(n, o)}", NodeId(o), "pqc", 1.0)
                          for e in edges for o in e if n in e and o != n)
            origin = Originator(NodeId(n), FED, (SaeId(f"s{n.lower()}"),), links, settings)
            db = Database(NodeId(n), verifier, now_ms=lambda: self.clock)
            self.engines[n] = LinkStateEngine(db, origin, signers[n], now_ms=lambda: self.clock)
        self.messages = 0

    def up(self, n: str) -> dict[NodeId, bool]:
        return {NodeId(o): frozenset((n, o)) in self.edges
                for e in self.edges for o in e if n in e and o != n}

    def deliver(self, src: str, sends: Sends) -> None:
        queue = [(src, sends)]
        while queue:
            s, out = queue.pop(0)
            for dst, records in out.by_node.items():
                if records and frozenset((s, dst)) in self.edges:
                    self.messages += 1
                    queue.append((dst, self.engines[dst].submit(NodeId(s), records)))

    def report_all(self) -> None:
        for n, e in self.engines.items():
            self.deliver(n, e.report(self.up(n), {}))

    def sync(self, a: str, b: str) -> None:
        """What two relays do when their neighbour comes up (RelayPeer.SyncLinkState)."""
        ea, eb = self.engines[a], self.engines[b]
        records, theirs = eb.sync(NodeId(a), ea.db.headers())
        self.deliver(b, Sends({NodeId(a): records}))
        self.deliver(a, Sends({NodeId(b): ea.missing_for(theirs)}))


def test_engines_converge_and_follow_a_link_going_down(verifier: Verifier,
                                                       signers: dict[str, Signer]) -> None:
    net = Net(verifier, signers, [("A", "B"), ("B", "C"), ("C", "M"), ("M", "A")])
    net.report_all()
    for a, b in (("A", "B"), ("B", "C"), ("C", "M"), ("M", "A")):
        net.sync(a, b)
    digests = {e.digest for e in net.engines.values()}
    assert len(digests) == 1
    assert routes(net.engines["A"].db).route_to_sae("sc").total_cost == 2.0
    # B-C fails: both ends see it; every node learns, A routes around by M.
    net.edges.discard(frozenset(("B", "C")))
    net.messages = 0
    net.clock += 1000
    for n in ("B", "C"):
        net.deliver(n, net.engines[n].report(net.up(n), {}))
    assert len({e.digest for e in net.engines.values()}) == 1
    assert routes(net.engines["A"].db).route_to_sae("sc").path == ("A", "M", "C")
    # Each of the two new records crossed each link of the flooding tree once.
    assert net.messages == 2 * (len(net.engines) - 1)


def test_a_restarted_node_signs_above_its_previous_records(
        verifier: Verifier, signers: dict[str, Signer]) -> None:
    net = Net(verifier, signers, [("A", "B")])
    net.report_all()
    net.sync("A", "B")
    before = net.engines["A"].db.get("A")
    assert before is not None
    # A restarts with the wall clock behind its old sequence numbers.
    net.clock -= 10_000
    origin = Originator(NodeId("A"), FED, (SaeId("sa"),), net.engines["A"].originator.links,
                        SETTINGS)
    fresh = LinkStateEngine(Database(NodeId("A"), verifier, now_ms=lambda: net.clock), origin,
                            signers["A"], now_ms=lambda: net.clock)
    net.engines["A"] = fresh
    net.report_all()
    net.sync("A", "B")
    mine = fresh.db.get("A")
    assert mine is not None
    assert mine.verified.record.sequence > before.verified.record.sequence
    held_by_b = net.engines["B"].db.get("A")
    assert held_by_b is not None and held_by_b.verified == mine.verified


# -- origination --------------------------------------------------------------------------


def _origin(**settings: float) -> Originator:
    links = (LocalLink("Q", NodeId("B"), "qkd", 1.0, nominal_rate_bps=1000.0),
             LocalLink("P", NodeId("C"), "pqc", 3.0))
    return Originator(NodeId("A"), FED, (), links,
                      dataclasses.replace(SETTINGS, **settings))  # type: ignore[arg-type]


def _announced(o: Originator, now: int) -> dict[str, tuple[bool, float, str]]:
    return {link.link_id: (link.up, link.cost, link.down_reason) for link in o.build(now).links}


UP = {NodeId("B"): True, NodeId("C"): True}


def test_qkd_cost_follows_smoothed_key_rate_with_hysteresis() -> None:
    o = _origin(rate_tau_s=1.0, min_cost_interval_s=0.0)
    t = NOW
    o.observe(UP, {"Q": DeviceReading(True, 1000.0, 10, 100)}, t)
    assert _announced(o, t) == {"Q": (True, 1.0, ""), "P": (True, 3.0, "")}
    # The rate drops tenfold: the smoothed rate follows within a few time constants.
    for _ in range(10):
        t += 1000
        o.observe(UP, {"Q": DeviceReading(True, 100.0, 10, 100)}, t)
    assert o.due(t)
    cost = _announced(o, t)["Q"][1]
    assert 9.0 < cost <= 10.0
    # Wobbles below the hysteresis factor sign nothing new.
    for rate in (90.0, 110.0, 95.0):
        t += 1000
        o.observe(UP, {"Q": DeviceReading(True, rate, 10, 100)}, t)
        assert not o.due(t)
    # A full store makes no key: such a sample says nothing about the link.
    t += 1000
    o.observe(UP, {"Q": DeviceReading(True, 0.0, 100, 100)}, t)
    assert not o.due(t)


def test_down_at_once_up_after_a_hold_and_operator_holds() -> None:
    o = _origin(up_hold_s=2.0)
    t = NOW
    o.observe(UP, {}, t)
    assert _announced(o, t)["Q"][0] is True
    t += 100
    o.observe(UP, {"Q": DeviceReading(False)}, t)
    assert o.due(t)
    assert _announced(o, t)["Q"] == (False, 1.0, "device unreachable")
    t += 100
    o.observe(UP, {"Q": DeviceReading(True, None, 10, 100)}, t)
    assert not o.due(t)  # healthy again, but held down
    assert _announced(o, t)["Q"] == (False, 1.0, "holding down")
    t += 2100
    o.observe(UP, {"Q": DeviceReading(True, None, 10, 100)}, t)
    assert o.due(t)
    assert _announced(o, t)["Q"][0] is True
    # A silent neighbour takes its links down; an operator's hold too.
    t += 100
    o.observe({NodeId("B"): True, NodeId("C"): False}, {}, t)
    assert _announced(o, t)["P"] == (False, 3.0, "neighbour silent")
    assert o.override("Q", False, None)
    assert _announced(o, t)["Q"] == (False, 1.0, "operator")
    # The operator's hold lifted: up at once (the down was no fault to damp).
    assert o.override("Q", True, None)
    assert o.due(t)
    assert _announced(o, t)["Q"] == (True, 1.0, "")
    assert not o.override("nope", False, None)


def test_refresh_signs_again_without_a_change() -> None:
    o = _origin(refresh_s=60.0)
    o.observe(UP, {}, NOW)
    first = o.build(NOW)
    assert not o.due(NOW + 59_000)
    assert o.due(NOW + 60_000)
    assert o.build(NOW + 60_000).sequence > first.sequence


# -- adjacency ------------------------------------------------------------------------------


def test_hellos_decide_liveness_and_when_to_sync() -> None:
    adj = Adjacencies([NodeId("B")], dead_ms=2000)
    assert adj.states(0) == {"B": False}
    adj.heard(NodeId("B"), "d1", "d1", 100)
    assert adj.states(100) == {"B": True}
    assert adj.take_sync(NodeId("B"))  # came up: sync once
    assert not adj.take_sync(NodeId("B"))
    adj.heard(NodeId("B"), "d1", "d2", 600)  # differ once: a flood may be under way
    assert not adj.take_sync(NodeId("B"))
    adj.heard(NodeId("B"), "d1", "d2", 1100)  # still the same difference: sync
    assert adj.take_sync(NodeId("B"))
    assert adj.states(3000) == {"B": True}
    assert adj.states(3200) == {"B": False}  # nothing heard for the dead interval


def test_an_engine_refuses_a_signer_that_is_not_its_node(verifier: Verifier,
                                                         signers: dict[str, Signer]) -> None:
    origin = Originator(NodeId("A"), FED, (), (), SETTINGS)
    with pytest.raises(ValueError, match="must be this node"):
        LinkStateEngine(Database(NodeId("A"), verifier), origin, signers["B"])


def test_unknown_sae_is_the_routes_error(verifier: Verifier, signers: dict[str, Signer]) -> None:
    db = database(verifier)
    for signed in line_records(signers).values():
        db.install(signed, None)
    with pytest.raises(KmstnError) as err:
        routes(db).node_of_sae("nobody")
    assert err.value.code is ErrorCode.UNKNOWN_SAE

