"""Benchmark of the relay: per-hop cost, KEM exchange round trip, messages/s.

    python -m relay.bench [--quick] [--messages 1000] [--runs 2000]

Prints three tables:

(a) per-hop seal + open in one process, excluding the network: the
    Sealer and Opener of two nodes wired directly (the receiver's session
    store serves the sender's pool; on a QKD hop an in-memory device pair
    stands in for the ETSI 014 calls). p50/p95 of seal, open and seal+open
    for a 300-byte ETSI 020 body, plus the receiver's one-time key
    generation per key (off the critical path: done ahead of time);
(b) the KEM exchange between two processes: ``RelayPeer.PublicKeys`` over
    mutual TLS from this process (holding node A's certificate) to a real
    relay process B, for 1 and 16 keys, and the paper's unpipelined exchange
    (PublicKeys(1) + Encapsulated);
(c) messages per second over one hop through gRPC: Seal at relay A, Open
    at relay B (both real processes), sequentially and from 4 client threads,
    over a PQC hop and over a QKD hop with the emulated devices
    (``python -m lab.qkdsim``).

Everything shares the machine (client, relays, emulator): on a 2-core box
the numbers in (b) and (c) include all of their CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kme.config import NodeConfig, load_node_config
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, NodeId, SecretBytes
from lab.pki import CertificateAuthority, Issued
from relay import kem
from relay.client import RelayClient
from relay.hop import Opener, Sealer
from relay.hopkey import DeviceClient, HopLinks
from relay.kempool import KeyPool
from relay.peer import RelayPeerClient, peer_channel

BODY = (b'{"keys":[{"key_ID":"5f0b2c63-5a8e-4a36-9d0c-1b7e8f3a9c21","key":'
        b'"q8vL3kqZ0m2mO6c9yXbq7o2vF1m1i5f3S3y2a1b0c9c=","size":256}],'
        b'"initiator_sae_id":"sae-a","target_sae_ids":["sae-b"],"ext_keys_mode":"sync",'
        b'"extension":{"kmstn_hop_budget":8,"kmstn_origin":"node-A","padding":"'
        + b"x" * 60 + b'"}}')


def _pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(label: str, samples: Sequence[float], unit: float = 1e6, suffix: str = "us") -> str:
    return (f"  {label:<38} p50 {statistics.median(samples) * unit:9.1f} {suffix}"
            f"   p95 {_pct(samples, 0.95) * unit:9.1f} {suffix}")


# -- (a) in-process ------------------------------------------------------------------------


class _MemoryDevicePair:
    """Both ends of a QKD link in memory: enc_keys at one end, dec_keys at the other."""

    def __init__(self) -> None:
        self.keys: dict[uuid.UUID, Key] = {}

    def end(self) -> DeviceClient:
        pair = self

        class End:
            def enc_keys(self, number: int = 1, size: int | None = None) -> list[Key]:
                out = [Key(uuid.uuid4(), SecretBytes(os.urandom(32)), 256)
                       for _ in range(number)]
                for k in out:
                    pair.keys[k.key_id] = k
                return out

            def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]:
                try:
                    return [pair.keys.pop(k) for k in key_ids]
                except KeyError:
                    raise KmstnError(ErrorCode.KEY_NOT_FOUND, "unknown key") from None

        return End()


class _Toward:
    def __init__(self, peer: NodeId, client: DeviceClient) -> None:
        self._peer, self._client = peer, client

    def toward(self, peer: NodeId) -> DeviceClient | None:
        return self._client if peer == self._peer else None


def bench_in_process(a: NodeConfig, b: NodeConfig, kind: str, runs: int) -> None:
    links_a, links_b = HopLinks(a), HopLinks(b)
    store = kem.SessionStore(3600, max_per_peer=runs + 1024)
    pool = KeyPool(b.node_id, lambda n: store.issue(a.node_id, n), 256, executor=None)
    devices_a = devices_b = None
    if kind == "qkd":
        pair = _MemoryDevicePair()
        devices_a = _Toward(b.node_id, pair.end())
        devices_b = _Toward(a.node_id, pair.end())
    sealer = Sealer(links_a, lambda peer: pool, devices_a)
    opener = Opener(links_b, store, devices_b)
    seal_t, open_t, both_t = [], [], []
    for _ in range(min(200, runs)):  # warm up
        opener.open(a.node_id, "ext_keys", sealer.seal(b.node_id, "ext_keys", BODY, 1))
    pool.refill(256)
    for i in range(runs):
        if len(pool) == 0:
            pool.refill(256)  # key generation is the receiver's, ahead of time
        t0 = time.perf_counter()
        data = sealer.seal(b.node_id, "ext_keys", BODY, 1)
        t1 = time.perf_counter()
        result = opener.open(a.node_id, "ext_keys", data)
        t2 = time.perf_counter()
        if result.body != BODY:
            raise AssertionError(f"message {i} did not round-trip")
        seal_t.append(t1 - t0)
        open_t.append(t2 - t1)
        both_t.append(t2 - t0)
    print(f" {kind.upper()} hop ({runs} messages, {len(BODY)}-byte body)")
    print(_row("seal", seal_t))
    print(_row("open", open_t))
    print(_row("seal + open", both_t))


def bench_keygen(runs: int) -> None:
    store = kem.SessionStore(3600, max_per_peer=runs + 10)
    samples = []
    for _ in range(max(1, runs // 64)):
        t0 = time.perf_counter()
        store.issue(NodeId("x"), 64)
        samples.append((time.perf_counter() - t0) / 64)
    print(" receiver key generation (per one-time key, batches of 64)")
    print(_row("ML-KEM-768 keygen + store", samples))


# -- processes -------------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Federation:
    """Two nodes A and B on 127.0.0.1 with a throwaway CA; a PQC or QKD link."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = root
        self.kind = kind
        self.ca = CertificateAuthority.create(root / "ca", days=1)
        host = "127.0.0.1"
        self.certs: dict[str, Issued] = {}
        lines = ['[federation]', 'name = "relay-bench"', ""]
        for n in ("A", "B"):
            self.certs[n] = self.ca.issue(n, root / "certs", ips=(host,), days=1)
            lines += ["[[kmstn]]", f'id = "{n}"', f'host = "{host}"',
                      f"etsi014_port = {_free_port(host)}", f"etsi020_port = {_free_port(host)}",
                      f"relay_port = {_free_port(host)}", ""]
        if kind == "qkd":
            lines += ["[[qkd_link]]", 'id = "QKD-A-B"', 'a = "A"', 'b = "B"',
                      "secret_key_rate = 100000000.0", "block_size = 65536", "",
                      "[qkd_link.alice]", f'host = "{host}"', f"port = {_free_port(host)}", "",
                      "[qkd_link.bob]", f'host = "{host}"', f"port = {_free_port(host)}", ""]
            for end in ("alice", "bob"):
                name = f"QKD-A-B-{end}"
                self.certs[name] = self.ca.issue(name, root / "certs", ips=(host,), days=1)
        else:
            lines += ["[[pqc_link]]", 'id = "PQC-A-B"', 'a = "A"', 'b = "B"', ""]
        self.topology = root / "topology.toml"
        self.topology.write_text("\n".join(lines))
        self.node_files: dict[str, Path] = {}
        for n in ("A", "B"):
            node_dir = root / n
            node_dir.mkdir()
            cert = self.certs[n]
            self.node_files[n] = node_dir / "node.toml"
            self.node_files[n].write_text("\n".join([
                f'node = "{n}"', f'topology = "{self.topology}"',
                f'data_dir = "{node_dir / "data"}"', "", "[tls]",
                f'ca = "{self.ca.cert_path}"', f'cert = "{cert.cert}"', f'key = "{cert.key}"',
                "", "[log]", 'level = "warning"', "", "[relay]", "kem_pool_size = 128", ""]))

    def config(self, n: str) -> NodeConfig:
        return load_node_config(self.node_files[n])


def _wait_grpc(target: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=1)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{target} not serving after {timeout}s")


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out,  # noqa: S603
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(fed: Federation) -> Iterator[tuple[NodeConfig, NodeConfig]]:
    with contextlib.ExitStack() as stack:
        if fed.kind == "qkd":
            from lab.qkdsim.config import sim_healthy, write_sim_config

            link = fed.config("A").topology.qkd_links[0]
            sim = write_sim_config(fed.root / "sim.toml", topology=fed.topology,
                                   link=link.id, ca=fed.ca.cert_path,
                                   alice=fed.certs["QKD-A-B-alice"],
                                   bob=fed.certs["QKD-A-B-bob"], log_level="warning")
            stack.enter_context(_process(["-m", "lab.qkdsim", "--config", str(sim)],
                                         fed.root / "qkdsim.log"))
            deadline = time.monotonic() + 30
            while not sim_healthy(link, fed.ca.cert_path, fed.certs):
                if time.monotonic() > deadline:
                    raise TimeoutError("qkdsim did not start")
                time.sleep(0.1)
        configs = []
        for n in ("A", "B"):
            config = fed.config(n)
            proc = stack.enter_context(_process(
                ["-m", "relay", "--config", str(fed.node_files[n])], fed.root / f"relay-{n}.log"))
            _wait_grpc(config.relay_endpoint.grpc_target, proc)
            configs.append(config)
        yield configs[0], configs[1]


def bench_kem_exchange(a: NodeConfig, runs: int) -> None:
    channel = peer_channel(a, NodeId("B"))
    peer = RelayPeerClient(channel)
    peer.public_keys(1)  # connect and handshake once
    one, sixteen, explicit = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        peer.public_keys(1)
        one.append(time.perf_counter() - t0)
    for _ in range(max(1, runs // 4)):
        t0 = time.perf_counter()
        peer.public_keys(16)
        sixteen.append(time.perf_counter() - t0)
    for _ in range(runs):
        t0 = time.perf_counter()
        (k,) = peer.public_keys(1)
        _, ct = kem.encapsulate(kem.load_public_key(k.public_key))
        peer.encapsulated(k.session, ct)
        explicit.append(time.perf_counter() - t0)
    channel.close()
    print(f" KEM exchange, this process -> relay B over mTLS ({runs} runs)")
    print(_row("PublicKeys(1) round trip", one, 1e3, "ms"))
    print(_row("PublicKeys(16) round trip", sixteen, 1e3, "ms"))
    print(_row("unpipelined: PublicKeys+Encapsulated", explicit, 1e3, "ms"))


def bench_throughput(a: NodeConfig, b: NodeConfig, kind: str, messages: int) -> None:
    chan_a = grpc.insecure_channel(a.relay_endpoint.grpc_target)
    chan_b = grpc.insecure_channel(b.relay_endpoint.grpc_target)
    client_a, client_b = RelayClient(chan_a, 30), RelayClient(chan_b, 30)

    def one() -> None:
        sealed = client_a.seal("B", "ext_keys", BODY, 1)
        if sealed.kind != kind or client_b.open("A", "ext_keys", sealed.envelope).body != BODY:
            raise AssertionError("hop failed")

    for _ in range(50):
        one()
    results = []
    for threads in (1, 4):
        t0 = time.perf_counter()
        if threads == 1:
            for _ in range(messages):
                one()
        else:
            with ThreadPoolExecutor(threads) as pool:
                for f in [pool.submit(one) for _ in range(messages)]:
                    f.result()
        elapsed = time.perf_counter() - t0
        results.append(f"{messages / elapsed:8.0f} msg/s with {threads} client thread"
                       f"{'s' if threads > 1 else ''}")
    chan_a.close()
    chan_b.close()
    print(f" {kind.upper()} hop, Seal at A + Open at B through gRPC ({messages} messages)")
    for line in results:
        print(f"  {line}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="in-process messages (a)")
    parser.add_argument("--messages", type=int, default=1000, help="messages per hop (c)")
    parser.add_argument("--exchanges", type=int, default=200, help="KEM round trips (b)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.messages, args.exchanges = 200, 100, 20
    # The relay's own INFO lines (one per seal) would be part of the timing.
    logging.getLogger("kmstn").setLevel(logging.WARNING)

    print("(a) per-hop cost in one process, network excluded")
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as tmp:
        for kind in ("pqc", "qkd"):
            fed = Federation(Path(tmp) / kind, kind)
            bench_in_process(fed.config("A"), fed.config("B"), kind, args.runs)
    bench_keygen(args.runs)
    print()
    print("(b) + (c) two relay processes (and the QKD emulator) on 127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as tmp:
        for kind in ("pqc", "qkd"):
            fed = Federation(Path(tmp) / kind, kind)
            with running(fed) as (a, b):
                if kind == "pqc":
                    bench_kem_exchange(a, args.exchanges)
                bench_throughput(a, b, kind, args.messages)


if __name__ == "__main__":
    main()
