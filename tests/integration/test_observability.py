"""Issue 13 acceptance: metrics of every service, the live dashboard, a key's path in the logs.

All against the paper's 8-node testbed started by the real launcher
(tests/testbed.py): every service its own process, real swtpm, SQLCipher,
mTLS and emulated QKD devices.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.dashboard import DashboardServer
from lab.saeclient import SaeClient
from tests.browser import CHROMIUM, Browser
from tests.helpers import REPO, run_cli
from tests.testbed import Testbed

pytestmark = pytest.mark.integration

PATH_NODES = ("KMSTN1", "KMSTN2", "KMSTN3", "KMSTN4")  # 1 =QKD= 2 --PQC-- 3 =QKD= 4
ARTEFACTS = REPO / "build" / "artefacts"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _scrape(testbed: Testbed, nodes: Iterable[str]) -> dict[str, Samples]:
    urls = testbed.manifest["metrics"]
    return {name: _parse(_get(url)) for name, url in urls.items()
            if name.split("/")[0] in set(nodes)}


# Counter families whose every change in this test is caused by the exchange
# (the relays' background refills of KEM and QKD hop keys call RelayPeer and
# the devices on their own schedule, so those are left out).
EXACT = ("kmstn_http_requests_total", "kmstn_keyvault_keys_total",
         "kmstn_grpc_server_handled_total", "kmstn_qkd_device_key_bits_total",
         "kmstn_key_delivered_bits_total", "kmstn_key_relayed_bits_total",
         "kmstn_relay_hops_total")


# What each relay tells its routing service of link state, every hello interval.
LINK_STATE_CALLS = frozenset({"ReportLocalState", "SubmitLinkState", "LinkStateSync"})


def _deltas(before: dict[str, Samples], after: dict[str, Samples]) -> dict[tuple[str, str, str],
                                                                             float]:
    out = {}
    for service, samples in after.items():
        if service.endswith("/relay"):
            # Hop keys: drawn ahead by the relay in the background.
            skip = {"kmstn_qkd_device_key_bits_total"}
        else:
            skip = set()
        for (name, labels), value in samples.items():
            if name not in EXACT or name in skip:
                continue
            if dict(labels).get("grpc_service") == "kme.rpc.v1.RelayPeer":
                continue
            if dict(labels).get("grpc_method") in LINK_STATE_CALLS:
                continue  # link state: the relay's hellos and reports, on their own clock
            moved = value - before[service].get((name, labels), 0.0)
            if moved:
                out[(service, name, ",".join(f"{k}={v}" for k, v in labels))] = moved
    return out


def _exchange(testbed: Testbed, master: str, slave: str, number: int
              ) -> list[dict[str, str]]:
    m = SaeClient.from_manifest(testbed.manifest, master)
    s = SaeClient.from_manifest(testbed.manifest, slave)
    try:
        status, body = m.enc_keys(slave, number, 256)
        assert status == 200, body
        keys: list[dict[str, str]] = body["keys"]
        status, got = s.dec_keys(master, [k["key_ID"] for k in keys])
        assert status == 200, got
        assert got["keys"] == keys
        return keys
    finally:
        m.close()
        s.close()


def test_every_service_counts_a_three_hop_exchange_exactly(testbed: Testbed) -> None:
    urls = testbed.manifest["metrics"]
    # Every service of every node has its own listener on its node's address.
    assert len(urls) == 8 * 5
    for name, url in urls.items():
        node = name.split("/")[0]
        host = next(k["etsi014_url"] for k in testbed.manifest["kmstns"] if k["id"] == node)
        assert url.startswith(f"http://{host.split('//')[1].rsplit(':', 1)[0]}:")
    _exchange(testbed, "SAE1", "SAE4", 1)  # warm-up: TLS sessions, KEM pools
    before = _scrape(testbed, PATH_NODES)
    _exchange(testbed, "SAE1", "SAE4", 2)
    after = _scrape(testbed, PATH_NODES)

    kv, relay = "kme.rpc.v1.KeyVault", "kme.rpc.v1.Relay"
    kinds = {"KMSTN1": "qkd", "KMSTN2": "pqc", "KMSTN3": "qkd"}  # the link each one sends on
    expected = {
        # The master's edge: one enc_keys, handed to its relay in one call,
        # which gives the master two 256-bit keys.
        ("KMSTN1/gateway014", "kmstn_http_requests_total",
         "api=etsi014,operation=enc_keys,status=200"): 1,
        ("KMSTN1/relay", "kmstn_grpc_server_handled_total",
         f"grpc_code=OK,grpc_method=GetKeys,grpc_service={relay}"): 1,
        ("KMSTN1/relay", "kmstn_key_delivered_bits_total", "role=master"): 512,
        # One sealed ext_keys per hop: sent by the relays of 1, 2 and 3 with
        # the two keys in it, received by the 020 listeners and relays of 2, 3
        # and 4, each listener making one Receive call to its relay.
        **{(f"{n}/relay", "kmstn_relay_hops_total",
            f"direction=sent,link_kind={kinds[n]},message_type=ext_keys,outcome=ok"): 1
           for n in PATH_NODES[:3]},
        **{(f"{n}/relay", "kmstn_key_relayed_bits_total", f"link_kind={kinds[n]}"): 512
           for n in PATH_NODES[:3]},
        **{(f"{n}/gateway020", "kmstn_http_requests_total",
            "api=etsi020,operation=ext_keys,status=200"): 1 for n in PATH_NODES[1:]},
        **{(f"{n}/relay", "kmstn_grpc_server_handled_total",
            f"grpc_code=OK,grpc_method=Receive,grpc_service={relay}"): 1
           for n in PATH_NODES[1:]},
        **{(f"{n}/relay", "kmstn_relay_hops_total",
            f"direction=received,link_kind={kinds[p]},message_type=ext_keys,outcome=ok"): 1
           for p, n in itertools.pairwise(PATH_NODES)},
        # The destination stores both keys and hands both to the slave once.
        ("KMSTN4/keyvault", "kmstn_grpc_server_handled_total",
         f"grpc_code=OK,grpc_method=Store,grpc_service={kv}"): 1,
        ("KMSTN4/keyvault", "kmstn_keyvault_keys_total", "event=stored"): 2,
        ("KMSTN4/keyvault", "kmstn_grpc_server_handled_total",
         f"grpc_code=OK,grpc_method=Take,grpc_service={kv}"): 1,
        ("KMSTN4/keyvault", "kmstn_keyvault_keys_total", "event=taken"): 2,
        ("KMSTN4/gateway014", "kmstn_http_requests_total",
         "api=etsi014,operation=dec_keys,status=200"): 1,
        ("KMSTN4/gateway014", "kmstn_key_delivered_bits_total", "role=slave"): 512,
    }
    assert _deltas(before, after) == expected
    # The master's two keys came from its side of QKD-1-2, drawn by its relay
    # (which also draws 256-bit hop keys ahead, on its own schedule).
    drawn = ("kmstn_qkd_device_key_bits_total",
             (("link", "QKD-1-2"), ("operation", "enc_keys")))
    moved = after["KMSTN1/relay"].get(drawn, 0.0) - before["KMSTN1/relay"].get(drawn, 0.0)
    assert moved >= 512 and moved % 256 == 0

    # Latency histograms moved with their counters.
    count = "kmstn_http_request_duration_seconds_count"
    enc = (count, (("api", "etsi014"), ("operation", "enc_keys"), ("status", "200")))
    assert after["KMSTN1/gateway014"][enc] - before["KMSTN1/gateway014"][enc] == 1
    handling = ("kmstn_grpc_server_handling_seconds_count",
                (("grpc_method", "Store"), ("grpc_service", kv)))
    assert after["KMSTN4/keyvault"][handling] - before["KMSTN4/keyvault"][handling] == 1
    # Stock and rows are read at scrape: nothing is left waiting at KMSTN4.
    assert after["KMSTN4/keyvault"][("kmstn_keyvault_rows", ())] == 0
    assert after["KMSTN4/keyvault"][("kmstn_keyvault_takes_waiting", ())] == 0
    # Every node's routing reports all seven links up.
    for n in PATH_NODES:
        ups = {dict(lb)["link"]: v for (name, lb), v in after[f"{n}/routing"].items()
               if name == "kmstn_link_up"}
        assert ups == dict.fromkeys(("QKD-1-2", "QKD-3-4", "QKD-5-6", "QKD-7-8", "PQC-2-3",
                                     "PQC-4-5", "PQC-6-7"), 1.0)
    # The relays at both ends of QKD-3-4 poll its device: pool level and size.
    for n in ("KMSTN3", "KMSTN4"):
        relay_samples = after[f"{n}/relay"]
        assert relay_samples[("kmstn_qkd_device_max_keys", (("link", "QKD-3-4"),))] == 25000
        stored = relay_samples[("kmstn_qkd_device_stored_keys", (("link", "QKD-3-4"),))]
        assert 0 <= stored <= 25000


def test_no_key_bytes_and_no_key_ids_in_any_metrics_output(testbed: Testbed) -> None:
    keys = _exchange(testbed, "SAE1", "SAE8", 3) + _exchange(testbed, "SAE2", "SAE1", 2)
    texts = {name: _get(url) for name, url in testbed.manifest["metrics"].items()}
    assert len(texts) == 40 and all("kmstn_" in t for t in texts.values())
    needles = []
    for key in keys:
        raw = base64.b64decode(key["key"])
        needles += [key["key_ID"], key["key_ID"].replace("-", ""), key["key"], raw.hex(),
                    base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    for name, text in texts.items():
        low = text.lower()
        for needle in needles:
            assert needle.lower() not in low, f"{name} exposes key material or a key ID"


def _links(browser: Browser) -> dict[str, str]:
    value = browser.evaluate(
        "JSON.stringify(Object.fromEntries([...document.querySelectorAll('line.link')]"
        ".map(l => [l.dataset.link, l.getAttribute('stroke')])))")
    return dict(json.loads(value))


def test_dashboard_draws_the_testbed_and_follows_a_link_going_down(
        testbed: Testbed, tmp_path: Path) -> None:
    # Installed by deploy/debian-deps.sh (make deps): a missing browser fails here.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} not found: run ./deploy/debian-deps.sh"
    server = DashboardServer(testbed.state, port=0).start()
    browser = Browser(server.url + "?interval=500")
    node_file = str(testbed.node_file("KMSTN3"))
    try:
        browser.wait_for("document.querySelectorAll('g.node').length === 8 && "
                         "document.querySelectorAll('line.link').length === 7")
        nodes = browser.evaluate(
            "[...document.querySelectorAll('g.node')].map(n => n.dataset.node).join(',')")
        assert sorted(nodes.split(",")) == [f"KMSTN{i}" for i in range(1, 9)]
        green = "#2e9d3a"
        browser.wait_for("[...document.querySelectorAll('line.link')]"
                         ".every(l => l.dataset.state === 'up')")
        assert set(_links(browser).values()) == {green}
        # Every node's five services answered the dashboard's scrape.
        assert browser.evaluate("[...document.querySelectorAll('g.node')]"
                                ".every(n => n.dataset.health === 'ok')")

        down = run_cli(["-m", "kme", "link", "--config", node_file, "QKD-3-4", "down"])
        assert down.returncode == 0, down.stdout + down.stderr
        browser.wait_for("document.querySelector('line[data-link=\"QKD-3-4\"]')"
                         ".dataset.state === 'down'")
        links = _links(browser)
        assert links["QKD-3-4"] == "#d62728"
        assert {k: v for k, v in links.items() if k != "QKD-3-4"} == dict.fromkeys(
            ["QKD-1-2", "QKD-5-6", "QKD-7-8", "PQC-2-3", "PQC-4-5", "PQC-6-7"], green)
        # Some traffic away from the broken link, so request rates and p50
        # latencies show in the picture (they are over the last 15 s).
        for master, slave in (("SAE1", "SAE2"), ("SAE5", "SAE6"), ("SAE7", "SAE8")):
            for _ in range(5):
                _exchange(testbed, master, slave, 1)
        browser.wait_for("document.querySelector('g.node[data-node=\"KMSTN7\"]')"
                         ".textContent.includes('ms')")
        # Every label of a horizontal link fits between the two node boxes (124 px wide).
        assert browser.evaluate(
            "[...document.querySelectorAll('g.link-group')].every(g => {"
            " const l = g.querySelector('line.link');"
            " const dx = Math.abs(l.x2.baseVal.value - l.x1.baseVal.value);"
            " const dy = Math.abs(l.y2.baseVal.value - l.y1.baseVal.value);"
            " return dx < dy || [...g.querySelectorAll('text.link-label')]"
            "   .every(t => t.getBBox().width <= dx - 124); })")
        shot = browser.screenshot(tmp_path / "dashboard-link-down.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, ARTEFACTS / shot.name)
    finally:
        run_cli(["-m", "kme", "link", "--config", node_file, "QKD-3-4", "up"])
        browser.close()
        server.close()
        # KMSTN3's hold on its own link reached every node by link state; so does its
        # release, within a hello interval: the next tests need the path back.
        _wait_routed(testbed, "KMSTN1", "SAE4")


def _wait_routed(testbed: Testbed, node: str, sae: str) -> None:
    for _ in range(300):
        got = run_cli(["-m", "kme", "route", "--config", str(testbed.node_file(node)), sae])
        if got.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{node} has no route to {sae} again: {got.stderr}")


def test_trace_prints_a_keys_path_through_every_node_it_crossed(testbed: Testbed) -> None:
    key_id = _exchange(testbed, "SAE1", "SAE4", 1)[0]["key_ID"]
    out = run_cli(["-m", "lab", "trace", "--state", str(testbed.state), key_id])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    nodes = {line.split()[1] for line in lines}
    assert {"KMSTN2", "KMSTN3", "KMSTN4"} <= nodes
    # The request ID crossed from each 020 listener into its relay over gRPC
    # metadata: both processes' lines of one hop carry the same ID.
    for node in ("KMSTN2", "KMSTN3"):
        mine = [line.split() for line in lines if line.split()[1] == node]
        by_service: dict[str, set[str]] = {}
        for fields in mine:
            by_service.setdefault(fields[2], set()).add(fields[3])
        assert by_service["gateway-etsi020"] & by_service["relay"], mine
    missing = run_cli(["-m", "lab", "trace", "--state", str(testbed.state),
                       "00000000-0000-4000-8000-000000000000"])
    assert missing.returncode == 1
