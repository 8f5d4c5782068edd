"""Benchmark: a real keyvault process, store and take throughput through gRPC.

    python -m keyvault.bench [--keys 4000] [--batches 1 10 100] [--clients 1]
                             [--preload 10000] [--tpm swtpm] [--upstream NODE]
                             [--jobs 1000]

It makes a throwaway node (CA, topology, node file) in a temporary
directory, starts ``python -m keyvault`` there (swtpm by default), and
reports:

- start-up: the time to unseal the root secret (start swtpm, TPM commands)
  and to open the SQLCipher database, at the first start (create and seal)
  and at a restart (unseal), as the process logs them;
- after ``--preload`` keys are stored and left waiting (a vault is rarely
  empty, and a fuller B-tree costs more pages per commit),
- for each batch size: keys/s for Store (fresh 256-bit keys) and then for
  Take of the same keys, over the unix socket, with ``--clients`` threads
  each using its own channel. Every call commits (WAL, synchronous = FULL).
  With ``--upstream`` the keys are stored as relayed from that neighbour
  (the upstream column is set, and each taken key's tombstone gets its
  keyed fingerprint), as on a node that receives ETSI 020 ext_keys;
- the outbox: ``--jobs`` jobs (256-byte payloads) put one per call, then
  listed, then completed one per call, jobs/s (every put and completion is
  one durable transaction).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyvault.client import KeyVaultClient
from kme.types import Key, KeyGrant, OutboxJob, SecretBytes
from lab.pki import CertificateAuthority


def _write_node(root: Path, tpm: str) -> Path:
    ca = CertificateAuthority.create(root / "ca", days=1)
    issued = ca.issue("A", root / "certs", ips=("127.0.0.1",), days=1)
    (root / "topology.toml").write_text(
        '[federation]\nname = "bench"\n\n[[kmstn]]\nid = "A"\nhost = "127.0.0.1"\n'
        "etsi014_port = 44301\netsi020_port = 44302\nrelay_port = 44303\n\n"
        '[[sae]]\nid = "master"\nkmstn = "A"\n\n[[sae]]\nid = "slave"\nkmstn = "A"\n')
    extra = ""
    if tpm == "file":
        key_file = root / "vault.key"
        key_file.write_text(os.urandom(32).hex())
        key_file.chmod(0o600)
        extra = f'key_file = "{key_file}"\n'
    node = root / "node.toml"
    node.write_text(
        f'node = "A"\ntopology = "{root / "topology.toml"}"\ndata_dir = "{root / "data"}"\n\n'
        f'[tls]\nca = "{ca.cert_path}"\ncert = "{issued.cert}"\nkey = "{issued.key}"\n\n'
        f'[keyvault]\ntpm = "{tpm}"\n{extra}')
    return node


class _Process:
    def __init__(self, node: Path, root: Path, run: int) -> None:
        self.log_path = root / f"keyvault-{run}.log"
        self.target = f"unix:{root / 'data' / 'run' / 'keyvault.sock'}"
        self._log = self.log_path.open("wb")
        started = time.perf_counter()
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "keyvault", "--config", str(node)],
            stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy()
        self.ready_s = time.perf_counter() - started

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"keyvault exited {self.proc.returncode}:\n"
                                 + self.log_path.read_text(errors="replace"))
            try:
                with grpc.insecure_channel(self.target) as ch:
                    status = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)
        raise SystemExit("keyvault did not become healthy in 60 s")

    def opened(self) -> dict[str, object]:
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("msg") == "vault opened":
                    return dict(entry)
        raise SystemExit("no 'vault opened' line in the log")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self._log.close()


def _run_parallel(clients: Sequence[KeyVaultClient],
                  work: Callable[[KeyVaultClient, int], None]) -> float:
    threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def bench_batch(target: str, n_keys: int, batch: int, n_clients: int,
                upstream: str | None = None) -> tuple[float, float]:
    """Store then take ``n_keys`` keys in batches; returns (store keys/s, take keys/s)."""
    channels = [grpc.insecure_channel(target) for _ in range(n_clients)]
    clients = [KeyVaultClient(ch, timeout=30) for ch in channels]
    per_client = n_keys // n_clients
    keys = [[Key(uuid.uuid4(), SecretBytes(os.urandom(32)), 256) for _ in range(per_client)]
            for _ in range(n_clients)]

    def store(c: KeyVaultClient, i: int) -> None:
        mine = keys[i]
        for j in range(0, len(mine), batch):
            c.store([KeyGrant(k, "master", ("slave",), "A", upstream)
                     for k in mine[j:j + batch]])

    def take(c: KeyVaultClient, i: int) -> None:
        mine = keys[i]
        for j in range(0, len(mine), batch):
            ids = [k.key_id for k in mine[j:j + batch]]
            got = c.take("slave", "master", ids)
            if len(got) != len(ids):
                raise SystemExit("take returned the wrong number of keys")

    total = per_client * n_clients
    store_s = _run_parallel(clients, store)
    take_s = _run_parallel(clients, take)
    for ch in channels:
        ch.close()
    return total / store_s, total / take_s


def bench_outbox(target: str, n_jobs: int) -> tuple[float, float, float]:
    """Put, list and complete ``n_jobs`` jobs; (put jobs/s, listed jobs/s, completed jobs/s)."""
    now = dt.datetime.now(dt.UTC)
    jobs = [OutboxJob(uuid.uuid4(), "deliver", "B", SecretBytes(os.urandom(256)),
                      expires_at=now + dt.timedelta(hours=1)) for _ in range(n_jobs)]
    with grpc.insecure_channel(target) as ch:
        client = KeyVaultClient(ch, timeout=60)
        started = time.perf_counter()
        for j in jobs:
            client.put_jobs([j])
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        listed = 0
        while listed < n_jobs:
            # A lease, as a worker would take them: each page is a new one.
            page = client.due_jobs(1000, lease_ms=600_000).jobs
            if not page:
                raise SystemExit("due_jobs returned fewer jobs than were put")
            listed += len(page)
        list_s = time.perf_counter() - started
        started = time.perf_counter()
        for j in jobs:
            if not client.complete_job(j.job_id):
                raise SystemExit("a job was missing")
        done_s = time.perf_counter() - started
    return n_jobs / put_s, n_jobs / list_s, n_jobs / done_s


def preload(target: str, n_keys: int) -> None:
    """Keys for another SAE pair that stay in the vault during the measurement."""
    with grpc.insecure_channel(target) as ch:
        client = KeyVaultClient(ch, timeout=60)
        for start in range(0, n_keys, 1000):
            client.store([KeyGrant(Key(uuid.uuid4(), SecretBytes(os.urandom(32)), 256),
                                    "other-master", ("other-slave",), "A")
                          for _ in range(min(1000, n_keys - start))])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=4000, help="keys per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--clients", type=int, default=1, help="concurrent client threads")
    parser.add_argument("--preload", type=int, default=10_000,
                        help="keys left waiting in the vault during the measurement")
    parser.add_argument("--tpm", choices=("swtpm", "file"), default="swtpm")
    parser.add_argument("--upstream", default=None,
                        help="store the keys as relayed from this neighbour node")
    parser.add_argument("--jobs", type=int, default=1000, help="outbox jobs (0: skip)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="kvbench-", dir="/tmp"))
    try:
        node = _write_node(root, args.tpm)
        first = _Process(node, root, 1)
        created = first.opened()
        first.stop()
        proc = _Process(node, root, 2)
        opened = proc.opened()
        print(f"start-up ({args.tpm}): first start (create + seal) "
              f"unseal {created['unseal_ms']} ms, open {created['open_ms']} ms; "
              f"restart: unseal {opened['unseal_ms']} ms, open {opened['open_ms']} ms, "
              f"healthy after {proc.ready_s * 1000:.0f} ms")
        try:
            preload(proc.target, args.preload)
            print(f"{'batch':>6} {'clients':>8} {'keys':>6} {'store keys/s':>13} "
                  f"{'take keys/s':>12}")
            for batch in args.batches:
                store_rate, take_rate = bench_batch(proc.target, args.keys, batch, args.clients,
                                                    args.upstream)
                print(f"{batch:>6} {args.clients:>8} {args.keys:>6} {store_rate:>13.0f} "
                      f"{take_rate:>12.0f}")
            if args.jobs:
                put_rate, list_rate, done_rate = bench_outbox(proc.target, args.jobs)
                print(f"outbox: {args.jobs} jobs, put {put_rate:.0f} jobs/s (one per call), "
                      f"listed {list_rate:.0f} jobs/s (pages of 1000, leased), "
                      f"completed {done_rate:.0f} jobs/s (one per call)")
        finally:
            proc.stop()
        origin = f"relayed from {args.upstream}" if args.upstream else "made on this node"
        print(f"(256-bit keys {origin}; {args.preload} other keys waiting; gRPC over the unix "
              "socket; every call one durable transaction)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
