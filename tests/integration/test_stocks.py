"""Issue 11: key stocks at both ends, through real processes and kill -9 of each service.

On the line W =QKD= X --PQC-- Y =QKD= Z, W keeps two stocks: toward Z for
sae-w -> sae-z (ext_keys over three hops) and toward its QKD neighbour X for
sae-w -> sae-x (a device-keys notice). Get key for those pairs is served from
the stock; the slave's node holds every stocked key for exactly that slave.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyvault.client import KeyVaultClient
from lab.saeclient import SaeClient
from tests.federation import line_topology
from tests.helpers import run_cli

pytestmark = pytest.mark.integration

SETTINGS = """
[W.supply]
stocks = [
  { destination = "Z", pairs = ["sae-w:sae-z"], keys = 12, batch = 4, share = 1.0 },
  { destination = "X", pairs = ["sae-w:sae-x"], keys = 8, batch = 4, share = 1.0 },
]
"""
STOCK_SIZES = {"sae-z": 12, "sae-x": 8}


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(os.path.realpath(tempfile.mkdtemp(prefix="kmst-", dir="/tmp")))
    yield path
    run_cli(["-m", "lab", "federation", "down", "--state", str(path / "state")])
    if not os.environ.get("KMSTN_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


def _up(root: Path, first_host: int) -> tuple[Path, dict[str, Any]]:
    settings = root / "node-settings.toml"
    settings.write_text(SETTINGS)
    state = root / "state"
    up = run_cli(["-m", "lab", "federation", "up", "--topology",
                  str(line_topology(root, first_host)), "--state", str(state),
                  "--node-settings", str(settings)], timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    return state, json.loads((state / "federation.json").read_text())


def _vault(state: Path, node: str) -> KeyVaultClient:
    return KeyVaultClient(grpc.insecure_channel(f"unix:{state}/run/{node}/keyvault.sock"))


def _entries(state: Path) -> dict[str, dict[str, set[str]]]:
    """W's stock entries per slave: state -> key IDs."""
    out: dict[str, dict[str, set[str]]] = {s: {"pending": set(), "ready": set(),
                                               "handed": set()} for s in STOCK_SIZES}
    for e in _vault(state, "W").stock_list():
        out[e.stock.slaves[0]][e.state].add(str(e.key_id))
    return out


def _until(what: str, check: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _full(state: Path) -> bool:
    # The relay takes a few keys of each stock ahead of Get key (handed in the keyvault).
    entries = _entries(state)
    return all(len(entries[s]["ready"] | entries[s]["handed"]) == n and not entries[s]["pending"]
               for s, n in STOCK_SIZES.items())


def _held(state: Path, node: str, slave: str) -> set[str]:
    """Key IDs the slave's node holds for sae-w -> slave."""
    return {k.key_id for k in _vault(state, node).list_pending(10_000, sae_id=slave)
            if k.master_sae_id == "sae-w"}


def test_a_stocked_key_is_served_at_once_and_only_to_its_named_slave(root: Path) -> None:
    state, manifest = _up(root, 131)
    _until("the stocks fill", lambda: _full(state))
    entries = _entries(state)["sae-z"]
    before = entries["ready"] | entries["handed"]
    # Both ends agree: everything ready (or taken ahead) at W is held at Z for sae-z.
    assert before == _held(state, "Z", "sae-z")
    master = SaeClient.from_manifest(manifest, "sae-w")
    status, st = master.status("sae-z")
    assert status == 200 and st["stored_key_count"] >= 12  # the stock counts for this pair
    status, body = master.enc_keys("sae-z", 2)
    assert status == 200, body
    ids = [k["key_ID"] for k in body["keys"]]
    assert set(ids) <= before  # from the stock (taken ahead or from the keyvault)
    # Another SAE cannot take them, not even one served by the same node as the slave.
    for other, node_sae in (("sae-y", "sae-w"), ("sae-x", "sae-w")):
        thief = SaeClient.from_manifest(manifest, other)
        assert thief.dec_keys(node_sae, ids)[0] in (400, 401)
        thief.close()
    slave = SaeClient.from_manifest(manifest, "sae-z")
    status, got = slave.dec_keys("sae-w", ids)
    assert (status, got.get("keys")) == (200, body["keys"])
    assert slave.dec_keys("sae-w", ids)[0] == 400  # once only
    # The QKD neighbour's stock (device-keys notice) works the same way.
    status, body = master.enc_keys("sae-x")
    assert status == 200, body
    neighbour = SaeClient.from_manifest(manifest, "sae-x")
    assert neighbour.dec_keys("sae-w", [body["keys"][0]["key_ID"]])[1].get("keys") == (
        body["keys"])
    for c in (master, slave, neighbour):
        c.close()


def test_kill_9_of_any_service_while_stocks_fill_and_serve_leaves_both_ends_agreeing(
        root: Path) -> None:
    """Every service on the path is killed with SIGKILL and restarted while masters take
    stocked keys (and stocks refill): no key is delivered twice or to an SAE not named,
    and afterwards every key W holds ready is held at the slave's node, and every key the
    slave's node holds for the pair is ready at W or was handed out by W."""
    state, manifest = _up(root, 135)
    _until("the stocks fill", lambda: _full(state))
    got: dict[str, list[dict[str, Any]]] = {s: [] for s in STOCK_SIZES}
    statuses: list[int] = []
    refusals: dict[int, str] = {}  # a message per status other than 200, for the failure text
    stop = threading.Event()

    def master(slave: str) -> None:
        client = SaeClient.from_manifest(manifest, "sae-w")
        while not stop.is_set():
            try:
                status, body = client.enc_keys(slave, 1)
            except OSError:  # the gateway was killed under the request
                client.close()
                status, body = 0, {}
            statuses.append(status)
            if status != 200:
                refusals.setdefault(status, str(body.get("message", body)))
            if status == 200:
                got[slave].extend(body["keys"])
            time.sleep(0.05)
        client.close()

    threads = [threading.Thread(target=master, args=(s,)) for s in STOCK_SIZES]
    for t in threads:
        t.start()
    try:
        for service in ("W/relay", "W/keyvault", "Z/relay", "Z/keyvault", "X/relay",
                        "X/keyvault", "Y/relay", "W/gateway014", "Z/gateway020",
                        "X/gateway020", "W/routing"):
            restart = run_cli(["-m", "lab", "federation", "restart", "--state", str(state),
                               service, "--kill"], timeout=120)
            assert restart.returncode == 0, (service, restart.stdout + restart.stderr)
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert set(statuses) <= {0, 200, 503}, refusals
    assert statuses.count(200) > 20
    # Settled: no fill in flight, no void or delivery pending at W.
    w = _vault(state, "W")
    _until("W settles", lambda: not any(e["pending"] for e in _entries(state).values())
           and not w.due_jobs(100).jobs and w.due_jobs(100).next_due_at is None)

    for slave, node in (("sae-z", "Z"), ("sae-x", "X")):
        client = SaeClient.from_manifest(manifest, slave)
        ids = [k["key_ID"] for k in got[slave]]
        assert len(ids) == len(set(ids))  # no key ID handed to the master twice
        # Nobody but the named slave takes them.
        thief = SaeClient.from_manifest(manifest, "sae-y")
        for key_id in ids[:20]:
            assert thief.dec_keys("sae-w", [key_id])[0] in (400, 401)
        thief.close()
        for key in got[slave]:  # each key the master got: once, with its bytes
            status, body = client.dec_keys("sae-w", [key["key_ID"]])
            assert (status, body.get("keys")) == (200, [key]), slave
            assert client.dec_keys("sae-w", [key["key_ID"]])[0] == 400
        client.close()
        entries = _entries(state)[slave]
        held = _held(state, node, slave)
        # Both ends agree: ready at W <=> held at the slave's node and not handed out.
        assert entries["ready"] <= held, (slave, entries["ready"] - held)
        assert held <= entries["ready"] | entries["handed"], (
            slave, held - entries["ready"] - entries["handed"])
        assert not held & set(ids)  # what the master got, the slave took
