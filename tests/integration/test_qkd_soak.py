"""Soak: concurrent clients against both ends of one emulated link for a minute or more.

Public emulators stalled within seconds under sustained load (locks held
across HTTP calls, no timeouts). Here, for ``KMSTN_SOAK_SECONDS`` (default
60) seconds:

- in each direction (Alice -> Bob and Bob -> Alice) two master threads take
  keys of mixed sizes with kme.qkd and hand them to two slave threads at the
  other end, which take them by ID (batches) and then ask for each one again;
- an independent client (nanoy42's, a new connection per call) polls status
  at both ends;
- a slow client opens a connection, sends half a request head and stalls.

Every call has a timeout, so a stall shows up as TIMEOUT errors, which fail
the test. At the end every key taken at one end must have been retrieved
exactly once at the other, with identical bytes, and the emulator's own
counters must agree.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pytest
from etsi_qkd_014_client import QKD014Client

from kme.errors import ErrorCode, KmstnError
from kme.qkd import QkdDeviceClient
from tests.contract.conftest import QkdSim
from tests.integration.conftest import SimFactory

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("KMSTN_SOAK_SECONDS", "60"))
SIZES = (64, 256, 512, 1024)


@dataclass
class Direction:
    name: str
    master: QkdDeviceClient
    slave: QkdDeviceClient
    handoff: queue.Queue[tuple[uuid.UUID, bytes, int]] = field(default_factory=queue.Queue)
    issued: dict[uuid.UUID, tuple[bytes, int]] = field(default_factory=dict)
    fetched: Counter[uuid.UUID] = field(default_factory=Counter)
    mismatched: list[uuid.UUID] = field(default_factory=list)
    refetch_ok: list[uuid.UUID] = field(default_factory=list)
    insufficient: int = 0
    issued_bits: int = 0


class Soak:
    def __init__(self, sim: QkdSim) -> None:
        self.sim = sim
        self.stop = threading.Event()
        self.producers_done = threading.Event()
        self.errors: list[str] = []
        self.guard = threading.Lock()  # only around in-memory bookkeeping
        a, b = sim.client("A"), sim.client("B")
        self.directions = [Direction("A->B", a, b), Direction("B->A", b, a)]
        self.status_polls = 0
        self.slow_dropped = 0

    def fail(self, where: str, exc: BaseException) -> None:
        with self.guard:
            self.errors.append(f"{where}: {exc!r} {getattr(exc, 'cause', '')}")

    def produce(self, d: Direction, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            if d.handoff.qsize() > 64:  # let the slaves keep up (their side costs more calls)
                time.sleep(0.005)
                continue
            number, size = rng.randint(1, 4), rng.choice(SIZES)
            try:
                keys = d.master.enc_keys(number, size)
            except KmstnError as exc:
                if exc.code is ErrorCode.INSUFFICIENT_KEY:
                    with self.guard:
                        d.insufficient += 1
                    time.sleep(0.01)
                    continue
                self.fail(f"{d.name} enc_keys", exc)
                return
            with self.guard:
                for k in keys:
                    d.issued[k.key_id] = (k.material.reveal(), k.size_bits)
                    d.issued_bits += k.size_bits
            for k in keys:
                d.handoff.put((k.key_id, k.material.reveal(), k.size_bits))

    def consume(self, d: Direction, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            batch: list[tuple[uuid.UUID, bytes, int]] = []
            try:
                batch.append(d.handoff.get(timeout=0.2))
                while len(batch) < rng.randint(1, 6):
                    batch.append(d.handoff.get_nowait())
            except queue.Empty:
                if not batch:
                    if self.producers_done.is_set():
                        return
                    continue
            try:
                got = d.slave.dec_keys([key_id for key_id, _, _ in batch])
            except KmstnError as exc:
                self.fail(f"{d.name} dec_keys", exc)
                return
            with self.guard:
                for (key_id, raw, size), key in zip(batch, got, strict=True):
                    d.fetched[key.key_id] += 1
                    if key.key_id != key_id or key.material.reveal() != raw or \
                            key.size_bits != size:
                        d.mismatched.append(key_id)
            for key_id, _, _ in batch:  # each one exactly once: a second take must fail
                try:
                    d.slave.dec_keys([key_id])
                except KmstnError as exc:
                    if exc.code is not ErrorCode.KEY_NOT_FOUND:
                        self.fail(f"{d.name} second dec_keys", exc)
                        return
                else:
                    with self.guard:
                        d.refetch_ok.append(key_id)

    def poll_status(self) -> None:
        sim = self.sim
        pollers = [
            (QKD014Client(f"{dev.host}:{dev.port}", str(sim.certs[sae].cert),
                          str(sim.certs[sae].key), str(sim.pki.ca_path)), peer)
            for dev, sae, peer in ((sim.alice, "A", "B"), (sim.bob, "B", "A"))]
        while not self.stop.is_set():
            for client, peer in pollers:
                try:
                    code, status = client.get_status(peer)
                except Exception as exc:  # the independent client raises its own types
                    self.fail("status poll", exc)
                    return
                if code != 200:
                    self.fail("status poll", RuntimeError(f"HTTP {code}: {status}"))
                    return
                with self.guard:
                    self.status_polls += 1
            time.sleep(0.05)

    def slow_client(self) -> None:
        """Half a request head, then silence, again and again: must not hold anything up."""
        ctx = self.sim.ssl_context("A")
        while not self.stop.is_set():
            try:
                with socket.create_connection((self.sim.alice.host, self.sim.alice.port),
                                              timeout=30) as raw, \
                        ctx.wrap_socket(raw, server_hostname=self.sim.alice.host) as tls:
                    tls.sendall(b"POST /api/v1/keys/B/enc_keys HTTP/1.1\r\nContent-Le")
                    tls.settimeout(30)
                    # The server drops the stalled request after its timeout.
                    while tls.recv(1024):
                        pass
                    with self.guard:
                        self.slow_dropped += 1
            except OSError:
                pass

    def run(self) -> None:
        threads = []
        for i, d in enumerate(self.directions):
            threads += [threading.Thread(target=self.produce, args=(d, 10 * i + j))
                        for j in range(2)]
        consumers = [threading.Thread(target=self.consume, args=(d, 100 + 10 * i + j))
                     for i, d in enumerate(self.directions) for j in range(2)]
        extras = [threading.Thread(target=self.poll_status),
                  threading.Thread(target=self.slow_client, daemon=True)]
        for t in threads + consumers + extras:
            t.start()
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline and not self.errors:
            time.sleep(0.5)
        self.stop.set()
        for t in threads:
            t.join(30)
        self.producers_done.set()
        for t in consumers + extras[:1]:
            t.join(60)
        for d in self.directions:
            d.master.close()


def test_soak_both_ends(qkd_sim: SimFactory) -> None:
    sim = qkd_sim(rate=2_000_000.0, block_size=8192, max_key_count=20_000,
                  max_key_per_request=16)
    soak = Soak(sim)
    soak.run()

    assert soak.errors == [], soak.errors[:10]
    print(f"soak {SECONDS:.0f} s: " + ", ".join(
        f"{d.name} {len(d.issued)} keys ({d.insufficient} x 503 insufficient)"
        for d in soak.directions) + f", {soak.status_polls} status polls, "
        f"{soak.slow_dropped} stalled requests dropped")
    total_bits = 0
    for d in soak.directions:
        assert d.issued, f"{d.name}: no key was issued"
        assert d.mismatched == [], f"{d.name}: keys differ between the ends"
        assert d.refetch_ok == [], f"{d.name}: keys delivered twice"
        # Every key taken at one end was retrieved exactly once at the other.
        assert set(d.fetched) == set(d.issued), d.name
        assert set(d.fetched.values()) == {1}, d.name
        total_bits += d.issued_bits
    # Keys issued at the two ends never collide.
    assert not set(soak.directions[0].issued) & set(soak.directions[1].issued)
    assert soak.status_polls > 0
    assert soak.slow_dropped > 0  # stalled requests were cut off, not served forever
    health = sim.health("alice")
    assert health["delivered_bits"] == total_bits
    assert health["pending_keys"] == {"alice": 0, "bob": 0}
    assert health["generated_bits"] == (health["stored_bits"] + health["dropped_bits"]
                                        + health["delivered_bits"])
