"""Build topology and node files for tests, with free ports and fresh certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import Pki, free_port, write_toml


class FederationFiles:
    """A topology under construction plus the node files of its KMSTNs."""

    def __init__(self, root: Path, pki: Pki, name: str = "test-federation") -> None:
        self.root = root
        self.pki = pki
        self.data: dict[str, Any] = {"federation": {"name": name}, "kmstn": [], "qkd_link": [],
                                     "pqc_link": [], "site_link": [], "sae": []}

    def kmstn(self, node: str, host: str = "127.0.0.1", kind: str = "kmstn") -> dict[str, Any]:
        entry: dict[str, Any] = {"id": node, "host": host}
        if kind == "kmstn":
            entry.update(etsi014_port=free_port(host), etsi020_port=free_port(host),
                         relay_port=free_port(host))
        else:
            entry.update(kind="foreign", etsi020_port=free_port(host))
        self.data["kmstn"].append(entry)
        return entry

    def host_of(self, node: str) -> str:
        return next(k["host"] for k in self.data["kmstn"] if k["id"] == node)

    def qkd(self, a: str, b: str, rate: float = 1_000_000.0, block_size: int = 8192,
            **extra: Any) -> dict[str, Any]:
        ha, hb = self.host_of(a), self.host_of(b)
        link = {"id": f"QKD-{a}-{b}", "a": a, "b": b, "secret_key_rate": rate,
                "block_size": block_size,
                "alice": {"host": ha, "port": free_port(ha)},
                "bob": {"host": hb, "port": free_port(hb)}, **extra}
        self.data["qkd_link"].append(link)
        return link

    def pqc(self, a: str, b: str, **extra: Any) -> dict[str, Any]:
        link = {"id": f"PQC-{a}-{b}", "a": a, "b": b, **extra}
        self.data["pqc_link"].append(link)
        return link

    def site(self, a: str, b: str, **extra: Any) -> dict[str, Any]:
        link = {"id": f"SITE-{a}-{b}", "a": a, "b": b, **extra}
        self.data["site_link"].append(link)
        return link

    def sae(self, sae: str, node: str) -> None:
        self.data["sae"].append({"id": sae, "kmstn": node})

    @property
    def topology_path(self) -> Path:
        return self.root / "topology.toml"

    def write(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.data.items() if v}
        return write_toml(self.topology_path, data)

    def node_file(self, node: str, **sections: Any) -> Path:
        """Write ``<root>/<node>/node.toml`` (the topology must be written first)."""
        cert, key = self.pki.issue(node, ips=(self.host_of(node),))
        node_dir = self.root / node
        node_dir.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "node": node,
            "topology": str(self.topology_path),
            "data_dir": str(node_dir / "data"),
            "tls": {"ca": str(self.pki.ca_path), "cert": str(cert), "key": str(key)},
        }
        for name, value in sections.items():
            data[name] = value
        return write_toml(node_dir / "node.toml", data)


def line_topology(root: Path, first_host: int) -> Path:
    """A line of four KMSTNs: W =QKD= X --PQC-- Y =QKD= Z (3 hops from W to Z)."""
    files = FederationFiles(root, pki=None)  # type: ignore[arg-type]
    for i, node in enumerate("WXYZ"):
        files.kmstn(node, f"127.0.0.{first_host + i}")
    files.qkd("W", "X", rate=1_000_000.0, block_size=8192, sim={"initial_keys": 500})
    files.pqc("X", "Y")
    files.qkd("Y", "Z", rate=1_000_000.0, block_size=8192, sim={"initial_keys": 500})
    for node in "WXYZ":
        files.sae(f"sae-{node.lower()}", node)
    return files.write()
