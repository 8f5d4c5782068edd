"""Per-node files: a topology split into node files that name only neighbours, loaded alone;
a node file that names anything further is refused, naming the field."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kme.config import ConfigError, LinkStateSettings, load_node_config, load_topology
from kme.config.split import dump_toml, neighbourhoods, split_topology_file
from lab.pki import LinkStateAuthority
from tests.helpers import REPO, Pki

EXAMPLES = [REPO / "examples" / "testbed.toml", REPO / "examples" / "mesh.toml"]


def mentioned_nodes(doc: dict[str, Any]) -> set[str]:
    """Every node ID a node file's tables name, wherever they name one."""
    names = {k["id"] for k in doc.get("kmstn", [])}
    for table in ("qkd_link", "pqc_link", "site_link"):
        for link in doc.get(table, []):
            names |= {link["a"], link["b"]}
    names |= {s["kmstn"] for s in doc.get("sae", [])}
    return names


def neighbours_in(path: Path, node: str) -> set[str]:
    topo = load_topology(path)
    return {link.other(node) for link in topo.links_of(node)}  # type: ignore[arg-type]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_split_node_files_name_only_the_node_and_its_neighbours(
        example: Path, tmp_path: Path, pki: Pki) -> None:
    full = load_topology(example)
    authority = LinkStateAuthority.create(tmp_path / "ls")
    tables = split_topology_file(example)
    assert set(tables) == {n for n, k in full.kmstns.items() if k.kind == "kmstn"}
    for node, doc in tables.items():
        near = neighbours_in(example, node)
        assert mentioned_nodes(doc) <= {node} | near, node
        cert, key = pki.issue(node, ips=(full.kmstns[node].host,))  # type: ignore[index]
        signing = authority.issue(node)
        text = dump_toml({"node": node, "data_dir": str(tmp_path / node), **doc,
                          "tls": {"ca": str(pki.ca_path), "cert": str(cert), "key": str(key)},
                          "linkstate": {"key": str(signing.key), "cert": str(signing.cert),
                                        "ca": str(authority.cert_path)}})
        assert "topology" not in tomllib.loads(text)
        path = tmp_path / f"{node}.toml"
        path.write_text(text)
        cfg = load_node_config(path)
        assert set(cfg.topology.kmstns) == {node} | near
        assert {s for s, n in cfg.topology.saes.items()} == set(full.saes_of(node))  # type: ignore[arg-type]
        assert {link.id for link in cfg.topology.links} == {
            link.id for link in full.links_of(node)}  # type: ignore[arg-type]
        # The node's devices and their far ends are as in the topology.
        for link in cfg.topology.qkd_links:
            assert link == full.link(link.id)
        assert isinstance(cfg.linkstate, LinkStateSettings)
        assert cfg.linkstate.hello_interval_ms == 500


def test_dump_toml_round_trips_a_topology() -> None:
    with EXAMPLES[1].open("rb") as fh:
        data = tomllib.load(fh)
    assert tomllib.loads(dump_toml(data)) == data
    for doc in neighbourhoods(data).values():
        assert tomllib.loads(dump_toml(doc)) == doc


def _node_doc(tmp_path: Path, pki: Pki) -> dict[str, Any]:
    doc = copy.deepcopy(split_topology_file(EXAMPLES[0])["KMSTN2"])
    cert, key = pki.issue("KMSTN2", ips=("127.0.0.12",))
    return {"node": "KMSTN2", "data_dir": str(tmp_path / "data"), **doc,
            "tls": {"ca": str(pki.ca_path), "cert": str(cert), "key": str(key)}}


def _far_node() -> dict[str, Any]:
    return {"id": "KMSTN5", "host": "127.0.0.15", "etsi014_port": 8014, "etsi020_port": 8020,
            "relay_port": 8021}


BEYOND: list[tuple[str, Any, str, str]] = [
    ("a node that is no neighbour", lambda d: d["kmstn"].append(_far_node()),
     "kmstn[3].id", "KMSTN5 is not a neighbour of KMSTN2"),
    ("a link between two neighbours",
     lambda d: d["pqc_link"].append({"id": "PQC-1-3", "a": "KMSTN1", "b": "KMSTN3"}),
     "pqc_link[1].a", "link PQC-1-3 does not end at KMSTN2"),
    ("an SAE of a neighbour", lambda d: d["sae"].append({"id": "SAE3", "kmstn": "KMSTN3"}),
     "sae[1].kmstn", "SAE3 is served by KMSTN3"),
    ("link state with a topology file",
     lambda d: d.update(topology=str(EXAMPLES[0]),
                        linkstate={"key": "k", "cert": "c", "ca": "a"}),
     "linkstate", "needs a per-node file"),
    ("a dead interval shorter than two hellos",
     lambda d: d.update(linkstate={"hello_interval_ms": 500, "dead_interval_ms": 600}),
     "linkstate.dead_interval_ms", "at least twice hello_interval_ms"),
]


@pytest.mark.parametrize(("case", "change", "field", "problem"), BEYOND,
                         ids=[c[0] for c in BEYOND])
def test_a_node_file_naming_more_than_its_neighbourhood_is_refused(
        tmp_path: Path, pki: Pki, case: str, change: Any, field: str, problem: str) -> None:
    doc = _node_doc(tmp_path, pki)
    change(doc)
    path = tmp_path / "node.toml"
    path.write_text(dump_toml(doc))
    with pytest.raises(ConfigError) as err:
        load_node_config(path)
    assert err.value.file == str(path)
    assert err.value.field == field
    assert problem in err.value.problem
