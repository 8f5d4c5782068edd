"""The node file's [supply] table (issue 11): defaults are today's behaviour; bad fields named."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kme.config import ConfigError, load_node_config
from tests.helpers import REPO, Pki, write_toml

TESTBED = REPO / "examples" / "testbed.toml"


def _node(tmp_path: Path, pki: Pki, **tables: Any) -> dict[str, Any]:
    cert, key = pki.issue("KMSTN1", ips=("127.0.0.11",))
    return {"node": "KMSTN1", "topology": str(TESTBED), "data_dir": str(tmp_path / "data"),
            "tls": {"ca": str(pki.ca_path), "cert": str(cert), "key": str(key)}, **tables}


def test_without_supply_nothing_changes(tmp_path: Path, pki: Pki) -> None:
    supply = load_node_config(write_toml(tmp_path / "n.toml", _node(tmp_path, pki))).supply
    assert not supply.enabled and supply.wait_ms == 0 and supply.stocks == ()


def test_stocks_quotas_and_waits_are_read(tmp_path: Path, pki: Pki) -> None:
    data = _node(tmp_path, pki, gateway={"relay_timeout_ms": 35_000}, supply={
        "wait_ms": 30_000,
        "stocks": [{"destination": "KMSTN8", "pairs": ["SAE1:SAE8"], "keys": 32}],
        "quotas": [{"sae": "SAE1", "rate_bps": 1000, "burst_bits": 2048},
                   {"sae": "SAE1", "slave": "SAE8", "rate_bps": 500.5, "burst_bits": 512}]})
    supply = load_node_config(write_toml(tmp_path / "n.toml", data)).supply
    assert supply.enabled and supply.wait_ms == 30_000
    (stock,) = supply.stocks
    assert (stock.destination, stock.pairs, stock.keys, stock.share) == (
        "KMSTN8", (("SAE1", "SAE8"),), 32, 0.5)
    assert [(q.sae, q.slave, q.rate_bps) for q in supply.quotas] == [
        ("SAE1", None, 1000.0), ("SAE1", "SAE8", 500.5)]


BAD: list[tuple[str, Any, str, str]] = [
    ("wait beyond the gateway's deadline", {"wait_ms": 30_000}, "supply.wait_ms",
     "raise that to at least 31000"),
    ("stock toward itself", {"stocks": [{"destination": "KMSTN1", "pairs": ["SAE1:SAE2"]}]},
     "supply.stocks[0].destination", "not another KMSTN"),
    ("pair not of this node", {"stocks": [{"destination": "KMSTN8", "pairs": ["SAE2:SAE8"]}]},
     "supply.stocks[0].pairs", "is not served by KMSTN1"),
    ("slave elsewhere", {"stocks": [{"destination": "KMSTN8", "pairs": ["SAE1:SAE2"]}]},
     "supply.stocks[0].pairs", "'SAE2' is not served by KMSTN8"),
    ("pair not a pair", {"stocks": [{"destination": "KMSTN8", "pairs": ["SAE1"]}]},
     "supply.stocks[0].pairs", "MASTER:SLAVE"),
    ("share above one", {"stocks": [{"destination": "KMSTN8", "pairs": ["SAE1:SAE8"],
                                     "share": 1.5}]}, "supply.stocks[0].share", "at most 1"),
    ("quota of another node's SAE", {"quotas": [{"sae": "SAE2", "rate_bps": 1,
                                                 "burst_bits": 1}]},
     "supply.quotas[0].sae", "not served by KMSTN1"),
    ("misspelt field", {"wait_msec": 5}, "supply.wait_msec", "unknown key"),
]


@pytest.mark.parametrize(("case", "supply", "field", "problem"), BAD, ids=[c[0] for c in BAD])
def test_bad_supply_names_file_and_field(tmp_path: Path, pki: Pki, case: str, supply: Any,
                                         field: str, problem: str) -> None:
    path = write_toml(tmp_path / "n.toml", _node(tmp_path, pki, supply=copy.deepcopy(supply)))
    with pytest.raises(ConfigError) as err:
        load_node_config(path)
    assert err.value.field == field
    assert problem in err.value.problem


def _per_node_file(tmp_path: Path, pki: Pki, supply: Any) -> Path:
    from kme.config.split import dump_toml, split_topology_file
    from lab.pki import LinkStateAuthority

    authority = LinkStateAuthority.create(tmp_path / "ls")
    signing = authority.issue("KMSTN1")
    cert, key = pki.issue("KMSTN1", ips=("127.0.0.11",))
    doc = {"node": "KMSTN1", "data_dir": str(tmp_path / "data"),
           **split_topology_file(TESTBED)["KMSTN1"],
           "tls": {"ca": str(pki.ca_path), "cert": str(cert), "key": str(key)},
           "linkstate": {"key": str(signing.key), "cert": str(signing.cert),
                         "ca": str(authority.cert_path)},
           "gateway": {"relay_timeout_ms": 35_000}, "supply": supply}
    path = tmp_path / "KMSTN1.toml"
    path.write_text(dump_toml(doc))
    return path


def test_a_per_node_file_names_a_far_stock_destination_as_written(tmp_path: Path,
                                                                   pki: Pki) -> None:
    # KMSTN8 and SAE8 are seven hops away: a node file that names only
    # neighbours cannot check them, so the stock is taken as written.
    path = _per_node_file(tmp_path, pki, {
        "wait_ms": 30_000, "stocks": [{"destination": "KMSTN8", "pairs": ["SAE1:SAE8"]}],
        "quotas": [{"sae": "SAE1", "slave": "SAE8", "rate_bps": 10, "burst_bits": 256}]})
    cfg = load_node_config(path)
    assert "KMSTN8" not in cfg.topology.kmstns
    assert [(s.destination, s.pairs) for s in cfg.supply.stocks] == [
        ("KMSTN8", (("SAE1", "SAE8"),))]


@pytest.mark.parametrize(("supply", "field", "problem"), [
    ({"stocks": [{"destination": "KMSTN1", "pairs": ["SAE1:SAE8"]}]},
     "supply.stocks[0].destination", "not another KMSTN"),
    ({"stocks": [{"destination": "KMSTN8", "pairs": ["SAE2:SAE8"]}]},
     "supply.stocks[0].pairs", "is not served by KMSTN1"),
    ({"quotas": [{"sae": "SAE8", "rate_bps": 1, "burst_bits": 1}]},
     "supply.quotas[0].sae", "not served by KMSTN1"),
], ids=["toward itself", "master elsewhere", "quota of a far SAE"])
def test_a_per_node_file_still_checks_what_it_knows(tmp_path: Path, pki: Pki, supply: Any,
                                                    field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_node_config(_per_node_file(tmp_path, pki, supply))
    assert err.value.field == field
    assert problem in err.value.problem
