"""kme.flows with fakes: the delivery logic of enc_keys / dec_keys / ext_keys / void.

Each node gets a real RoutingTable (pure logic) and in-memory fakes for the
keyvault, its job table, QKD devices and the hop; the fake hop hands a
message straight to the neighbour's receiver, and a refusal crosses the same
two tables a real one does (gateway/errors.py renders it as problem details,
relay/outcomes.py reads it back), so multi-hop behaviour is exercised
without processes. The real services are tested with real processes in
tests/integration.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import etsi020_problem
from kme import etsi014, etsi020
from kme import flows as kflows
from kme.config import (
    DeviceEndpoint,
    GatewaySettings,
    KeyvaultSettings,
    Kmstn,
    Link,
    NodeConfig,
    QkdDeviceAccess,
    QkdLink,
    RelaySettings,
    Topology,
)
from kme.errors import ErrorCode, KmstnError
from kme.flows import DeviceKeysNotice, Flows, Job, Jobs, Outgoing, Retrier
from kme.types import Deadline, Key, KeyGrant, NodeId, SaeId, SecretBytes
from relay.outcomes import read_answer
from relay.transport import encode
from routing.graph import RoutingTable


class FakeVault:
    def __init__(self) -> None:
        self.keys: dict[uuid.UUID, dict[str, Any]] = {}
        self.cond = threading.Condition()

    def store(self, items: Sequence[KeyGrant]) -> None:
        with self.cond:
            for it in items:
                old = self.keys.get(it.key.key_id)
                if old and old["key"].material != it.key.material:
                    raise KmstnError(ErrorCode.KEY_CONFLICT, "key ID conflict")
                self.keys[it.key.key_id] = {"key": it.key, "master": it.master_sae_id,
                                            "allowed": set(it.allowed_sae_ids), "taken": set()}
            self.cond.notify_all()

    def take(self, sae: str, master: str, ids: Sequence[uuid.UUID], wait_ms: int = 0
             ) -> list[Key]:
        with self.cond:
            self.cond.wait_for(lambda: all(i in self.keys for i in ids), wait_ms / 1000)
            recs = [self.keys.get(i) for i in ids]
            if any(r is None or r["master"] != master or sae in r["taken"] for r in recs):
                raise KmstnError(ErrorCode.KEY_NOT_FOUND, "not found")
            if any(sae not in r["allowed"] for r in recs):  # type: ignore[index]
                raise KmstnError(ErrorCode.PERMISSION_DENIED, "not named")
            for i, r in zip(ids, recs, strict=True):
                r["taken"].add(sae)  # type: ignore[index]
                if r["taken"] >= r["allowed"]:  # type: ignore[index]
                    del self.keys[i]
            return [r["key"] for r in recs]  # type: ignore[index]

    def void(self, ids: Sequence[uuid.UUID], initiator: str, targets: Sequence[str],
             all_confirmation: bool = False, upstream: NodeId | None = None
             ) -> list[etsi020.AckContainer]:
        with self.cond:
            gone = [i for i in ids if self.keys.pop(i, None) is not None]
        missing = [i for i in ids if i not in gone]
        acks = []
        if gone:
            acks.append(etsi020.AckContainer(tuple(gone), "voided", initiator, tuple(targets)))
        if missing:
            acks.append(etsi020.AckContainer(tuple(missing), "key not present", initiator,
                                             tuple(targets)))
        return acks


class SharedLink:
    """Both ends of one emulated QKD link: a key issued at one end is readable once at the other."""

    def __init__(self, link: QkdLink) -> None:
        self.link = link
        self.issued: dict[uuid.UUID, tuple[NodeId, Key]] = {}
        self.lock = threading.Lock()
        self.drawn = 0


@dataclass
class FakeDevice:
    shared: SharedLink
    node: NodeId

    @property
    def link(self) -> QkdLink:
        return self.shared.link

    def enc_keys(self, number: int = 1, size: int | None = None, *,
                 reserved_ok: bool = False) -> list[Key]:
        size = size or self.link.key_size
        keys = [Key(uuid.uuid4(), SecretBytes(secrets.token_bytes(size // 8)), size)
                for _ in range(number)]
        with self.shared.lock:
            self.shared.drawn += number
            for k in keys:
                self.shared.issued[k.key_id] = (self.node, k)
        return keys

    def dec_keys(self, ids: Sequence[uuid.UUID]) -> list[Key]:
        with self.shared.lock:
            found = [self.shared.issued.get(i) for i in ids]
            if any(f is None or f[0] == self.node for f in found):
                raise KmstnError(ErrorCode.KEY_NOT_FOUND, "not on device")
            for i in ids:
                del self.shared.issued[i]
            return [f[1] for f in found]  # type: ignore[index]

    def status(self) -> Any:
        return type("S", (), {"stored_key_count": 1000})()


@dataclass
class FakeDevices:
    node: NodeId
    links: dict[NodeId, SharedLink]

    def toward(self, peer: NodeId) -> FakeDevice | None:
        shared = self.links.get(peer)
        return FakeDevice(shared, self.node) if shared else None

    def for_link(self, link_id: str) -> FakeDevice:
        return next(FakeDevice(s, self.node) for s in self.links.values() if s.link.id == link_id)


class FakeJobs:
    """The keyvault's job table, in memory."""

    def __init__(self) -> None:
        self.jobs: dict[uuid.UUID, Job] = {}

    def put(self, jobs: Sequence[Job]) -> None:
        self.jobs.update((j.job_id, j) for j in jobs)

    def done(self, job_id: uuid.UUID) -> None:
        self.jobs.pop(job_id, None)

    def retry_later(self, job_id: uuid.UUID, due: datetime.datetime) -> None:
        self.jobs[job_id] = dataclasses.replace(self.jobs[job_id], next_due_at=due,
                                                attempts=self.jobs[job_id].attempts + 1)

    def due(self, limit: int) -> tuple[list[Job], datetime.datetime | None]:
        return list(self.jobs.values())[:limit], None


@dataclass
class FakeHop:
    node: NodeId
    net: Federation
    sent: list[tuple[str, str]] = field(default_factory=list)

    def send(self, peer: NodeId, message: Outgoing, hop: int, deadline: Deadline
             ) -> list[etsi020.AckContainer]:
        message_type, body = encode(message)
        self.sent.append((peer, message_type))
        if peer in self.net.down:
            raise KmstnError(ErrorCode.UNAVAILABLE, "peer unreachable")
        receiver = self.net.flows[NodeId(peer)].receiver
        try:
            if isinstance(message, etsi020.ExtKeyContainer):
                c = etsi020.parse_ext_keys(body)
                acks = receiver.ext_keys(self.node, c, hop, deadline)
            elif isinstance(message, etsi020.VoidContainer):
                acks = receiver.void(self.node, etsi020.parse_void(body), hop, deadline)
            elif isinstance(message, DeviceKeysNotice):
                acks = receiver.device_keys(self.node, DeviceKeysNotice.from_json(body),
                                            deadline)
            else:
                raise AssertionError(message_type)
        except KmstnError as exc:
            status, problem = etsi020_problem(exc)  # what the neighbour's listener sends
            return read_answer(status, problem, message_type)
        return read_answer(200, etsi020.acks_json(acks), message_type)

    def acks_arrived(self, peer: NodeId, acks: Sequence[etsi020.AckContainer]
                     ) -> list[uuid.UUID]:
        return []


class Node:
    """One node's flows, called the way its two gateways call them."""

    def __init__(self, cfg: NodeConfig, flows: Flows, vault: FakeVault) -> None:
        self.cfg = cfg
        self.flows = flows
        self.vault = vault

    def enc_keys(self, master: str, slave: str, number: int, size: int,
                 additional_slaves: Sequence[str] = ()) -> list[Key]:
        return self.flows.northbound.enc_keys(master, [slave, *additional_slaves], number,
                                              size, Deadline.after(10))

    def dec_keys(self, slave: str, master: str, ids: Sequence[uuid.UUID]) -> list[Key]:
        return kflows.dec_keys(self.cfg, self.vault.take, slave, master, ids)

    def plan_ext_keys(self, peer: NodeId, c: etsi020.ExtKeyContainer, hop: int) -> Any:
        return self.flows.receiver.plan(peer, c, hop)

    def ext_keys(self, peer: NodeId, c: etsi020.ExtKeyContainer, hop: int
                 ) -> list[etsi020.AckContainer]:
        return self.flows.receiver.ext_keys(peer, c, hop, Deadline.after(10))

    def void(self, peer: NodeId, v: etsi020.VoidContainer, hop: int
             ) -> list[etsi020.AckContainer]:
        return self.flows.receiver.void(peer, v, hop, Deadline.after(10))

    @property
    def receiver(self) -> Any:
        return self.flows.receiver

    def status(self, master: str, slave: str) -> dict[str, Any]:
        return etsi014.status_body(self.flows.northbound.status(master, slave))

    @property
    def devices(self) -> Any:
        return self.flows.ctx.devices

    @devices.setter
    def devices(self, devices: Any) -> None:
        self.flows.ctx.devices = devices

    @property
    def routing(self) -> Any:
        return self.flows.ctx.routes

    @property
    def STATUS_MAX_AGE_S(self) -> float:  # noqa: N802 - the northbound's constant
        return self.flows.northbound.STATUS_MAX_AGE_S

    @STATUS_MAX_AGE_S.setter
    def STATUS_MAX_AGE_S(self, seconds: float) -> None:  # noqa: N802
        self.flows.northbound.STATUS_MAX_AGE_S = seconds

    @property
    def _retrier(self) -> Any:  # pending durable work
        return self.flows.jobs

    @property
    def _pool(self) -> Any:
        return self.flows.ctx.pool

    def close(self) -> None:
        self.flows.close()


class Federation:
    """A line of nodes: kinds[i] is the link between node i and node i+1."""

    def __init__(self, kinds: Sequence[str], delivery: str = "confirmed") -> None:
        n = len(kinds) + 1
        nodes = {NodeId(f"N{i}"): Kmstn(NodeId(f"N{i}"), "127.0.0.1", 1, 2, 3, "kmstn")
                 for i in range(n)}
        links: list[Link] = []
        for i, kind in enumerate(kinds):
            a, b = NodeId(f"N{i}"), NodeId(f"N{i + 1}")
            if kind == "qkd":
                links.append(QkdLink(id=f"Q{i}", kind="qkd", a=a, b=b, cost=1.0,
                                     secret_key_rate=1e6, block_size=1024,
                                     alice=DeviceEndpoint("127.0.0.1", 1, "x", SaeId(a)),
                                     bob=DeviceEndpoint("127.0.0.1", 2, "y", SaeId(b))))
            else:
                links.append(Link(id=f"P{i}", kind="pqc", a=a, b=b, cost=1.0))
        saes = {SaeId(f"S{i}"): NodeId(f"N{i}") for i in range(n)}
        saes[SaeId("S0b")] = NodeId("N0")
        saes[SaeId(f"S{n - 1}b")] = NodeId(f"N{n - 1}")
        self.topology = Topology(Path("/mem"), "t", 256, nodes, tuple(links), saes)
        shared = {link.id: SharedLink(link) for link in links if isinstance(link, QkdLink)}
        self.shared = shared
        self.down: set[str] = set()
        self.vaults: dict[NodeId, FakeVault] = {}
        self.flows: dict[NodeId, Node] = {}
        self.relays: dict[NodeId, FakeHop] = {}
        for node in nodes:
            cfg = NodeConfig(
                source=Path("/mem"), node=nodes[node], topology=self.topology,
                data_dir=Path("/nonexistent"), tls=None, keyvault_endpoint=None,  # type: ignore[arg-type]
                routing_endpoint=None, relay_endpoint=None, log_level="info",  # type: ignore[arg-type]
                gateway=GatewaySettings(delivery=delivery, inflight_wait_ms=2000),  # type: ignore[arg-type]
                keyvault=KeyvaultSettings(), relay=RelaySettings(),
                qkd_devices={ln.id: QkdDeviceAccess(ln.id, None)  # type: ignore[arg-type]
                             for ln in links if isinstance(ln, QkdLink) and node in (ln.a, ln.b)})
            mine = {ln.other(node): shared[ln.id] for ln in links
                    if isinstance(ln, QkdLink) and node in (ln.a, ln.b)}
            self.vaults[node] = FakeVault()
            self.relays[node] = FakeHop(node, self)
            flows = Flows(cfg, RoutingTable(self.topology, node), self.vaults[node],
                          self.relays[node], FakeDevices(node, mine),  # type: ignore[arg-type]
                          FakeJobs(), workers=4)
            self.flows[node] = Node(cfg, flows, self.vaults[node])

    def close(self) -> None:
        for f in self.flows.values():
            f.close()


@pytest.fixture
def paper_line() -> Any:
    fed = Federation(["qkd", "pqc", "qkd", "pqc", "qkd", "pqc", "qkd"])
    yield fed
    fed.close()


def test_longest_path_delivers_identical_keys_once(paper_line: Federation) -> None:
    f0, f7 = paper_line.flows[NodeId("N0")], paper_line.flows[NodeId("N7")]
    keys = f0.enc_keys("S0", "S7", 3, 256)
    assert len(keys) == 3
    # Confirmed mode: the keys were in N7's vault before the master got them.
    got = f7.dec_keys("S7", "S0", [k.key_id for k in keys])
    assert [k.material for k in got] == [k.material for k in keys]
    with pytest.raises(KmstnError) as err:
        f7.dec_keys("S7", "S0", [keys[0].key_id])
    assert err.value.code is ErrorCode.KEY_NOT_FOUND
    # The message went hop by hop: every node forwarded once.
    for i in range(7):
        assert paper_line.relays[NodeId(f"N{i}")].sent == [(f"N{i + 1}", "ext_keys")]


def test_qkd_neighbour_gets_no_key_relay(paper_line: Federation) -> None:
    f0, f1 = paper_line.flows[NodeId("N0")], paper_line.flows[NodeId("N1")]
    keys = f0.enc_keys("S0", "S1", 2, 256)
    # Only the device-keys notice (IDs, no bytes) crossed; the bytes came over QKD.
    assert paper_line.relays[NodeId("N0")].sent == [("N1", "device_keys")]
    got = f1.dec_keys("S1", "S0", [k.key_id for k in keys])
    assert [k.material for k in got] == [k.material for k in keys]
    assert not paper_line.shared["Q0"].issued  # read once at the far end


def test_unnamed_sae_is_refused_and_key_survives(paper_line: Federation) -> None:
    f0, f7 = paper_line.flows[NodeId("N0")], paper_line.flows[NodeId("N7")]
    keys = f0.enc_keys("S0", "S7", 1, 256)
    ids = [keys[0].key_id]
    with pytest.raises(KmstnError) as err:
        f7.dec_keys("S7b", "S0", ids)  # served by N7 but not named
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    with pytest.raises(KmstnError) as err:
        f0.dec_keys("S7", "S0", ids)  # asking at the wrong KMSTN
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    assert "served by N7" in err.value.public
    assert f7.dec_keys("S7", "S0", ids)[0].material == keys[0].material


def test_multicast_to_slaves_on_different_nodes(paper_line: Federation) -> None:
    f0 = paper_line.flows[NodeId("N0")]
    keys = f0.enc_keys("S0", "S1", 1, 256, additional_slaves=["S3", "S7"])
    for node, sae in (("N1", "S1"), ("N3", "S3"), ("N7", "S7")):
        got = paper_line.flows[NodeId(node)].dec_keys(sae, "S0", [keys[0].key_id])
        assert got[0].material == keys[0].material


def test_local_slave_and_master_mismatch(paper_line: Federation) -> None:
    f0 = paper_line.flows[NodeId("N0")]
    keys = f0.enc_keys("S0", "S0b", 1, 256)
    with pytest.raises(KmstnError) as err:
        f0.dec_keys("S0b", "S7", [keys[0].key_id])  # wrong master: reveal nothing
    assert err.value.code is ErrorCode.KEY_NOT_FOUND
    assert f0.dec_keys("S0b", "S0", [keys[0].key_id])[0].material == keys[0].material
    with pytest.raises(KmstnError) as err:
        f0.enc_keys("S7", "S0", 1, 256)  # a master of another node
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    with pytest.raises(KmstnError) as err:
        f0.enc_keys("S0", "nobody", 1, 256)
    assert err.value.code is ErrorCode.UNKNOWN_SAE


def test_confirmed_mode_failure_gives_503_and_voids_placed_copies(paper_line: Federation) -> None:
    f0 = paper_line.flows[NodeId("N0")]
    paper_line.down.add("N6")  # N5 cannot reach N6: the relay toward S7 fails mid-path
    with pytest.raises(KmstnError) as err:
        f0.enc_keys("S0", "S3", 1, 256, additional_slaves=["S7"])
    assert err.value.code is ErrorCode.UNAVAILABLE
    # The copy that did reach N3 is voided (in the background).
    f0._pool.submit(lambda: None).result()
    f0.close()
    assert not paper_line.vaults[NodeId("N3")].keys


def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_void_that_cannot_pass_is_sent_again_when_the_path_is_back(
        paper_line: Federation) -> None:
    f0 = paper_line.flows[NodeId("N0")]
    paper_line.down.add("N6")
    with pytest.raises(KmstnError) as err:
        f0.enc_keys("S0", "S7", 1, 256)
    assert err.value.code is ErrorCode.UNAVAILABLE
    # The void toward N7 cannot pass N5 either: it waits for another try.
    _until(lambda: f0._retrier.pending() == 1)
    voids_to_n6 = lambda: paper_line.relays[NodeId("N5")].sent.count(("N6", "void"))  # noqa: E731
    tried = voids_to_n6()
    assert tried >= 1
    paper_line.down.discard("N6")
    _until(lambda: f0._retrier.pending() == 0 and voids_to_n6() > tried)


def test_retrier_tries_again_with_growing_delays_then_gives_up() -> None:
    log = logging.getLogger("test.retrier")
    retrier = Retrier(log, delays=(0.01, 0.02, 0.04))
    calls: list[float] = []

    def flaky() -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise KmstnError(ErrorCode.UNAVAILABLE, "not yet")

    never: list[int] = []

    def hopeless() -> None:
        never.append(1)
        raise KmstnError(ErrorCode.TIMEOUT, "never")

    retrier.submit(flaky, {"job": "flaky"})
    retrier.submit(hopeless, {"job": "hopeless"})
    _until(lambda: len(calls) == 3 and len(never) == 3 and retrier.pending() == 0)
    assert calls[1] - calls[0] >= 0.02 and calls[2] - calls[1] >= 0.04
    time.sleep(0.1)
    assert (len(calls), len(never)) == (3, 3)  # done, and given up after the last delay
    retrier.close()


def test_concurrent_mode_delivers_at_once_and_slave_waits() -> None:
    fed = Federation(["qkd", "pqc", "qkd"], delivery="concurrent")
    try:
        f0, f3 = fed.flows[NodeId("N0")], fed.flows[NodeId("N3")]
        keys = f0.enc_keys("S0", "S3", 1, 256)
        # The slave may ask before the key landed: dec_keys waits for it.
        got = f3.dec_keys("S3", "S0", [keys[0].key_id])
        assert got[0].material == keys[0].material
    finally:
        fed.close()


def test_concurrent_mode_keeps_delivering_while_the_path_is_down() -> None:
    """The master already holds the keys: a delivery that fails on a broken path is
    sent again until the path is back, rather than voided at the first failure."""
    fed = Federation(["qkd", "pqc", "qkd"], delivery="concurrent")
    try:
        f0, f3 = fed.flows[NodeId("N0")], fed.flows[NodeId("N3")]
        fed.down.add("N2")
        keys = f0.enc_keys("S0", "S3", 1, 256)
        _until(lambda: f0._retrier.pending() == 1)
        assert not fed.vaults[NodeId("N3")].keys
        fed.down.discard("N2")
        _until(lambda: bool(fed.vaults[NodeId("N3")].keys))
        assert f3.dec_keys("S3", "S0", [keys[0].key_id])[0].material == keys[0].material
    finally:
        fed.close()


def test_ext_keys_refuses_routes_back_and_mandatory_extensions(paper_line: Federation) -> None:
    f3 = paper_line.flows[NodeId("N3")]
    key = etsi020.ExtKey(uuid.uuid4(), SecretBytes(bytes(32)))
    back = etsi020.ExtKeyContainer((key,), "S7", ("S0",))
    with pytest.raises(KmstnError) as err:
        f3.plan_ext_keys(NodeId("N2"), back, 1)  # S0 lies behind N2, the sender
    assert err.value.code is ErrorCode.INVALID_ROUTING
    ext = etsi020.ExtKeyContainer((key,), "S0", ("S7",), extension_mandatory={"E1_x": 1})
    with pytest.raises(KmstnError) as err:
        f3.plan_ext_keys(NodeId("N2"), ext, 1)
    assert err.value.code is ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION
    with pytest.raises(KmstnError) as err:
        f3.plan_ext_keys(NodeId("N2"), etsi020.ExtKeyContainer((key,), "S0", ("S7",)), 33)
    assert err.value.code is ErrorCode.NO_ROUTE  # hop limit


def test_resent_ext_keys_is_idempotent_and_conflicts_are_refused(paper_line: Federation) -> None:
    f7 = paper_line.flows[NodeId("N7")]
    key = etsi020.ExtKey(uuid.uuid4(), SecretBytes(bytes(range(32))))
    c = etsi020.ExtKeyContainer((key,), "S0", ("S7",))
    assert f7.ext_keys(NodeId("N6"), c, 7)[0].ack_status == "relayed"
    assert f7.ext_keys(NodeId("N6"), c, 7)[0].ack_status == "relayed"  # same again: fine
    other = etsi020.ExtKeyContainer((etsi020.ExtKey(key.key_id, SecretBytes(bytes(32))),),
                                    "S0", ("S7",))
    with pytest.raises(KmstnError) as err:
        f7.ext_keys(NodeId("N6"), other, 7)
    assert err.value.code is ErrorCode.KEY_CONFLICT
    assert f7.dec_keys("S7", "S0", [key.key_id])[0].material == key.value


def test_void_travels_to_the_destination(paper_line: Federation) -> None:
    f0 = paper_line.flows[NodeId("N0")]
    keys = f0.enc_keys("S0", "S7", 2, 256)
    v = etsi020.VoidContainer((keys[0].key_id,), "S0", ("S7",))
    acks = paper_line.flows[NodeId("N1")].void(NodeId("N0"), v, 1)
    assert [(a.ack_status, a.key_ids) for a in acks] == [("voided", (keys[0].key_id,))]
    f7 = paper_line.flows[NodeId("N7")]
    with pytest.raises(KmstnError):
        f7.dec_keys("S7", "S0", [keys[0].key_id])
    assert f7.dec_keys("S7", "S0", [keys[1].key_id])[0].material == keys[1].material


def test_void_of_all_keys_fails_loudly_and_an_empty_answer_is_fine(paper_line: Federation
                                                                   ) -> None:
    v = etsi020.VoidContainer((), "S0", ("S7",), None, True)
    n1 = paper_line.flows[NodeId("N1")]
    paper_line.down.add("N6")
    with pytest.raises(KmstnError) as err:
        n1.void(NodeId("N0"), v, 1)
    assert err.value.code is ErrorCode.UNAVAILABLE and "all keys" in err.value.public
    paper_line.down.discard("N6")
    # N7 holds nothing for this set and answers []: nothing failed.
    assert n1.void(NodeId("N0"), v, 1) == []


def test_csprng_source_when_a_node_has_no_qkd_link() -> None:
    fed = Federation(["pqc", "pqc"])
    try:
        keys = fed.flows[NodeId("N0")].enc_keys("S0", "S2", 2, 264)
        assert {len(k.material) for k in keys} == {33}
        assert keys[0].material != keys[1].material
        got = fed.flows[NodeId("N2")].dec_keys("S2", "S0", [k.key_id for k in keys])
        assert [k.material for k in got] == [k.material for k in keys]
    finally:
        fed.close()


class SlowToStartJobs(FakeJobs):
    """A keyvault that cannot answer the first ``failures`` listings (still starting)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def due(self, limit: int) -> tuple[list[Job], datetime.datetime | None]:
        if self.failures:
            self.failures -= 1
            raise KmstnError(ErrorCode.TIMEOUT, "internal service unavailable")
        return super().due(limit)


def test_recorded_work_is_resumed_even_when_the_keyvault_answers_late() -> None:
    """A relay that starts before its keyvault can answer (or while it is slow) lists its
    pending work again until it can: recorded work is never left behind for that."""

    store = SlowToStartJobs(failures=2)
    ran = threading.Event()
    jobs = Jobs(store, logging.getLogger("test"), run=lambda fn: fn())
    jobs.register("void", lambda job: ran.set())
    job = jobs.new("void", NodeId("KMSTN2"), b"{}")
    store.put([job])
    jobs.resume_at_start()  # fails now, and once more a second later
    assert ran.wait(10)
    assert store.failures == 0 and job.job_id not in store.jobs
    jobs.close()
