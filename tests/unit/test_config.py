"""Configuration validation: the good example loads, and every bad file names its field."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kme.config import ConfigError, QkdLink, load_node_config, load_topology
from tests.helpers import REPO, Pki, write_toml

TESTBED = REPO / "examples" / "testbed.toml"


def load_testbed() -> dict[str, Any]:
    with TESTBED.open("rb") as fh:
        return tomllib.load(fh)


def test_testbed_example_matches_the_paper() -> None:
    topo = load_topology(TESTBED)
    assert list(topo.kmstns) == [f"KMSTN{i}" for i in range(1, 9)]
    qkd = {(link.a, link.b): link for link in topo.qkd_links}
    assert set(qkd) == {("KMSTN1", "KMSTN2"), ("KMSTN3", "KMSTN4"),
                        ("KMSTN5", "KMSTN6"), ("KMSTN7", "KMSTN8")}
    # About 2,500 b/s, and about 450 b/s on the 120 km link (Table III).
    for pair, link in qkd.items():
        assert isinstance(link, QkdLink)
        expected = 450 if pair == ("KMSTN5", "KMSTN6") else 2500
        assert abs(link.secret_key_rate - expected) / expected < 0.1
    pqc = {(link.a, link.b) for link in topo.links if link.kind == "pqc"}
    assert pqc == {("KMSTN2", "KMSTN3"), ("KMSTN4", "KMSTN5"), ("KMSTN6", "KMSTN7")}
    assert {topo.saes[s] for s in topo.saes} == set(topo.kmstns)
    assert len({k.host for k in topo.kmstns.values()}) == 8


def mutate(fn: Any) -> dict[str, Any]:
    data = load_testbed()
    fn(data)
    return data


BAD_TOPOLOGIES: list[tuple[str, Any, str, str]] = [
    ("unknown top-level key", lambda d: d.update(extra=1), "extra", "unknown key"),
    ("typo inside a link", lambda d: d["qkd_link"][0].update(secret_key_rat=5),
     "qkd_link[0].secret_key_rat", "unknown key"),
    ("port not an integer", lambda d: d["kmstn"][2].update(etsi014_port="abc"),
     "kmstn[2].etsi014_port", "must be an integer"),
    ("port out of range", lambda d: d["kmstn"][0].update(etsi020_port=70000),
     "kmstn[0].etsi020_port", "from 1 to 65535"),
    ("duplicate node", lambda d: d["kmstn"][1].update(id="KMSTN1"),
     "kmstn[1].id", "duplicate KMSTN id"),
    ("link to unknown node", lambda d: d["qkd_link"][0].update(b="KMSTN9"),
     "qkd_link[0].b", "unknown KMSTN 'KMSTN9'"),
    ("zero key rate", lambda d: d["qkd_link"][2].update(secret_key_rate=0),
     "qkd_link[2].secret_key_rate", "greater than 0"),
    ("missing device", lambda d: d["qkd_link"][1].pop("alice"),
     "qkd_link[1].alice", "is required"),
    ("SAE at unknown node", lambda d: d["sae"][3].update(kmstn="nowhere"),
     "sae[3].kmstn", "unknown KMSTN"),
    ("SAE ID with a slash", lambda d: d["sae"][0].update(id="a/b"),
     "sae[0].id", "SAE ID must be 1-64 URI characters"),
    ("negative cost", lambda d: d["pqc_link"][0].update(cost=-1),
     "pqc_link[0].cost", "greater than 0"),
    ("missing federation name", lambda d: d["federation"].pop("name"),
     "federation.name", "is required"),
    ("link to itself", lambda d: d["pqc_link"][1].update(b="KMSTN4"),
     "pqc_link[1].b", "two different KMSTNs"),
    ("site link between two kmstn nodes",
     lambda d: d.update(site_link=[{"id": "S", "a": "KMSTN1", "b": "KMSTN3"}]),
     "site_link[0].a", "neither end is foreign"),
    ("listener clash", lambda d: d["kmstn"][1].update(host="127.0.0.11"),
     "kmstn[1].etsi014_port", "127.0.0.11:8014 is already used by kmstn[0].etsi014_port"),
    ("key size outside limits", lambda d: d["qkd_link"][0].update(key_size=2048, max_key_size=1024),
     "qkd_link[0].key_size", "must lie between"),
    ("wrong type for a table", lambda d: d.update(federation="x"),
     "federation", "must be a table"),
    ("negative outage", lambda d: d["qkd_link"][0].update(
        sim={"outage": [{"start_s": -1, "duration_s": 2}]}),
     "qkd_link[0].sim.outage[0].start_s", "zero or more"),
]


@pytest.mark.parametrize(("case", "change", "field", "problem"), BAD_TOPOLOGIES,
                         ids=[c[0] for c in BAD_TOPOLOGIES])
def test_bad_topology_names_file_and_field(tmp_path: Path, case: str, change: Any,
                                           field: str, problem: str) -> None:
    path = write_toml(tmp_path / "topology.toml", mutate(change))
    with pytest.raises(ConfigError) as err:
        load_topology(path)
    assert err.value.file == str(path)
    assert err.value.field == field
    assert problem in err.value.problem
    assert str(err.value).startswith(f"{path}: {field}: ")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[federation\nname = 1\n")
    with pytest.raises(ConfigError) as err:
        load_topology(path)
    assert str(err.value).startswith(f"{path}: not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_topology(tmp_path / "absent.toml")


def _node_data(tmp_path: Path, pki: Pki) -> dict[str, Any]:
    cert, key = pki.issue("KMSTN1", ips=("127.0.0.11",))
    return {"node": "KMSTN1", "topology": str(TESTBED), "data_dir": str(tmp_path / "data"),
            "tls": {"ca": str(pki.ca_path), "cert": str(cert), "key": str(key)}}


def test_good_node_file(tmp_path: Path, pki: Pki) -> None:
    data = _node_data(tmp_path, pki)
    data["gateway"] = {"delivery": "concurrent", "inflight_wait_ms": 500}
    cfg = load_node_config(write_toml(tmp_path / "node.toml", data))
    assert cfg.node_id == "KMSTN1"
    assert cfg.gateway.delivery == "concurrent"
    assert cfg.routing_endpoint.scheme == "unix"
    assert cfg.routing_endpoint.address == str(tmp_path / "data" / "run" / "routing.sock")
    # The node's one QKD link is reachable with its own certificate by default.
    assert set(cfg.qkd_devices) == {"QKD-1-2"}
    assert cfg.qkd_devices["QKD-1-2"].tls == cfg.tls


BAD_NODES: list[tuple[str, Any, str, str]] = [
    ("node not in topology", lambda d: d.update(node="KMSTN42"), "node", "not in the topology"),
    ("certificate missing", lambda d: d["tls"].update(cert="/nonexistent/cert.pem"),
     "tls.cert", "file not found"),
    ("delivery mode unknown", lambda d: d.update(gateway={"delivery": "fast"}),
     "gateway.delivery", "must be one of confirmed, concurrent"),
    ("file TPM without key file", lambda d: d.update(keyvault={"tpm": "file"}),
     "keyvault.key_file", "is required"),
    ("service endpoint scheme", lambda d: d.update(services={"routing": "http://x:1"}),
     "services.routing", "unix:PATH or tcp://HOST:PORT"),
    ("misspelt section", lambda d: d.update(gatway={}), "gatway", "unknown key"),
    ("device of another node", lambda d: d.update(qkd_device=[{"link": "QKD-3-4"}]),
     "qkd_device[0].link", "is not a QKD link of KMSTN1"),
    ("missing data_dir", lambda d: d.pop("data_dir"), "data_dir", "is required"),
]


@pytest.mark.parametrize(("case", "change", "field", "problem"), BAD_NODES,
                         ids=[c[0] for c in BAD_NODES])
def test_bad_node_file_names_file_and_field(tmp_path: Path, pki: Pki, case: str, change: Any,
                                            field: str, problem: str) -> None:
    data = copy.deepcopy(_node_data(tmp_path, pki))
    change(data)
    path = write_toml(tmp_path / "node.toml", data)
    with pytest.raises(ConfigError) as err:
        load_node_config(path)
    assert err.value.file == str(path)
    assert err.value.field == field
    assert problem in err.value.problem


def test_bad_topology_named_through_node_file(tmp_path: Path, pki: Pki) -> None:
    topo = write_toml(tmp_path / "topology.toml",
                      mutate(lambda d: d["kmstn"][0].update(relay_port=0)))
    data = _node_data(tmp_path, pki)
    data["topology"] = str(topo)
    with pytest.raises(ConfigError) as err:
        load_node_config(write_toml(tmp_path / "node.toml", data))
    # The error names the topology file, where the bad field is.
    assert err.value.file == str(topo)
    assert err.value.field == "kmstn[0].relay_port"
