"""The topology file: the whole federation, the same on every node.

KMSTNs (and foreign KMSs) with their addresses, QKD links with their secret
key rate and device endpoints, PQC links, site links to foreign KMSs, and
SAEs with the node that serves them. :func:`load_topology` reads and checks
it; every problem is a ConfigError naming the file and the field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal, TypedDict, TypeVar

from kme.config.model import (
    KMSTN_KINDS,
    DeviceEndpoint,
    Kmstn,
    Link,
    LinkKindName,
    Outage,
    QkdLink,
    QkdSimSettings,
    Topology,
)
from kme.config.reader import ConfigError, Table, field_default, read_toml
from kme.errors import KmstnError
from kme.types import NodeId, SaeId, node_id, sae_id

__all__ = ["host_field", "load_topology", "read_topology"]


class _Bounds(TypedDict):
    lo: int
    hi: int


_PORT: Final[_Bounds] = {"lo": 1, "hi": 65535}
_I = TypeVar("_I", bound=str)
# Classical links, read alike: two kmstn ends (pqc) or a kmstn and a foreign KMS (site).
_PLAIN_KINDS: Final[tuple[Literal["pqc", "site"], ...]] = ("pqc", "site")


def host_field(t: Table, key: str) -> str:
    """An IP address or DNS host name (ConfigError otherwise)."""
    value = t.text(key)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value.rstrip(".").split(".")
        if not all(lab and len(lab) <= 63 and lab.replace("-", "").isalnum() for lab in labels):
            raise t.error(key, f"must be an IP address or host name, got {value!r}") from None
    return value


def _ident(t: Table, key: str, parse: Callable[[str], _I]) -> _I:
    """A node or SAE ID, checked by ``parse`` (kme.types.node_id or sae_id)."""
    value = t.text(key)
    try:
        return parse(value)
    except KmstnError as exc:
        raise t.error(key, exc.public) from None


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; raises ConfigError naming the field."""
    file = Path(path).resolve()
    root = Table(file, read_toml(file))
    topology = read_topology(file, root)
    root.close()
    return topology


def read_topology(file: Path, root: Table) -> Topology:
    """The federation tables of ``root`` ([federation], [[kmstn]], links, [[sae]]).

    A topology file is nothing else; a node file holds the same tables for
    its neighbourhood (kme.config.node), so both are read by this one
    function. The caller closes ``root`` (refusing keys nobody read).
    """
    fed = root.table("federation")
    name = fed.text("name")
    # The federation's key size is what a QKD link has when it names none.
    key_size = fed.integer("key_size", field_default(QkdLink, "key_size", int), lo=8, hi=65536)
    fed.close()

    kmstns = _read_kmstns(file, root)
    links = _Links(kmstns)
    for t in root.tables("qkd_link", QkdLink, required=("secret_key_rate", "block_size")):
        links.add(_read_qkd_link(t, links, key_size))
        t.close()
    for kind in _PLAIN_KINDS:
        for t in root.tables(f"{kind}_link", Link):
            lid, a, b, cost = links.common(t, kind)
            links.add(Link(id=lid, kind=kind, a=a, b=b, cost=cost))
            t.close()

    saes: dict[SaeId, NodeId] = {}
    for t in root.tables("sae"):
        sid = _ident(t, "id", sae_id)
        if sid in saes:
            raise t.error("id", f"duplicate SAE id {sid!r}")
        node = t.text("kmstn")
        if node not in kmstns:
            raise t.error("kmstn", f"unknown KMSTN {node!r}")
        saes[sid] = NodeId(node)
        t.close()

    _check_addresses(file, kmstns, links.links)
    return Topology(source=file, name=name, key_size=key_size, kmstns=kmstns,
                    links=tuple(links.links), saes=saes)


def _read_kmstns(file: Path, root: Table) -> dict[NodeId, Kmstn]:
    kmstns: dict[NodeId, Kmstn] = {}
    for t in root.tables("kmstn", Kmstn):
        nid = _ident(t, "id", node_id)
        if nid in kmstns:
            raise t.error("id", f"duplicate KMSTN id {nid!r}")
        kind = t.choice("kind", KMSTN_KINDS, "kmstn")
        host = host_field(t, "host")
        k = Kmstn(
            id=nid,
            host=host,
            etsi014_port=t.integer("etsi014_port", **_PORT) if kind == "kmstn" else
            t.integer("etsi014_port", 0, lo=0, hi=65535),
            etsi020_port=t.integer("etsi020_port", **_PORT),
            relay_port=t.integer("relay_port", **_PORT) if kind == "kmstn" else 0,
            kind=kind,
        )
        t.close()
        kmstns[nid] = k
    if not kmstns:
        raise ConfigError(file, "kmstn", "at least one [[kmstn]] is required")
    return kmstns


class _Links:
    """The links read so far, and the checks every link kind shares."""

    def __init__(self, kmstns: Mapping[NodeId, Kmstn]) -> None:
        self.kmstns = kmstns
        self.links: list[Link] = []
        self._ids: set[str] = set()
        self._pairs: set[tuple[str, frozenset[str]]] = set()

    def add(self, link: Link) -> None:
        self.links.append(link)

    def common(self, t: Table, kind: LinkKindName) -> tuple[str, NodeId, NodeId, float]:
        lid = t.text("id")
        if lid in self._ids:
            raise t.error("id", f"duplicate link id {lid!r}")
        self._ids.add(lid)
        ends = []
        for end in ("a", "b"):
            n = t.text(end)
            if n not in self.kmstns:
                raise t.error(end, f"unknown KMSTN {n!r}")
            ends.append(NodeId(n))
        if ends[0] == ends[1]:
            raise t.error("b", "a link must join two different KMSTNs")
        pair = (kind, frozenset(ends))
        if pair in self._pairs:
            raise t.error("id", f"a {kind} link between {ends[0]} and {ends[1]} already exists")
        self._pairs.add(pair)
        foreign = [self.kmstns[e].kind == "foreign" for e in ends]
        if kind == "site" and not any(foreign):
            raise t.error("a", "a site link joins a KMSTN to a foreign KMS; neither end is foreign")
        if kind == "site" and all(foreign):
            raise t.error("b", "a site link needs one kmstn end; both ends are foreign")
        if kind != "site" and any(foreign):
            bad = "a" if foreign[0] else "b"
            raise t.error(bad, f"a {kind} link cannot end at a foreign KMS; use [[site_link]]")
        cost = t.number("cost", 1.0)
        return lid, ends[0], ends[1], cost


def _read_qkd_link(t: Table, links: _Links, key_size: int) -> QkdLink:
    lid, a, b, cost = links.common(t, "qkd")
    ksize = t.integer("key_size", key_size, lo=1, hi=65536)
    # The size limits default to the model's, widened to hold this link's key size.
    min_size = t.integer("min_key_size", min(t.field_default("min_key_size", int), ksize),
                         lo=1, hi=65536)
    max_size = t.integer("max_key_size", max(t.field_default("max_key_size", int), ksize),
                         lo=1, hi=65536)
    if not min_size <= ksize <= max_size:
        raise t.error("key_size", f"must lie between min_key_size {min_size} and "
                                  f"max_key_size {max_size}, got {ksize}")
    devices = [_read_device(t, "alice", a, lid), _read_device(t, "bob", b, lid)]
    if devices[0].sae_id == devices[1].sae_id:
        raise t.error("bob.sae_id", "must differ from alice.sae_id")
    sim = _read_sim(t.table("sim", QkdSimSettings))
    return QkdLink(
        id=lid, kind="qkd", a=a, b=b, cost=cost,
        secret_key_rate=t.number("secret_key_rate"),
        block_size=t.integer("block_size", lo=8, hi=1 << 30),
        key_size=ksize,
        min_key_size=min_size,
        max_key_size=max_size,
        max_key_count=t.integer("max_key_count", lo=1),
        max_key_per_request=t.integer("max_key_per_request", lo=1, hi=100_000),
        alice=devices[0],
        bob=devices[1],
        sim=sim,
    )


def _read_device(t: Table, end: str, node: NodeId, lid: str) -> DeviceEndpoint:
    d = t.table(end)
    if not d.data:
        raise t.error(end, "is required (the device KME beside this end)")
    dev_sae = d.text("sae_id", str(node))
    try:
        sae_id(dev_sae)
    except KmstnError as exc:
        raise d.error("sae_id", exc.public) from None
    device = DeviceEndpoint(
        host=host_field(d, "host"),
        port=d.integer("port", **_PORT),
        kme_id=d.text("kme_id", f"{lid}-{end}"),
        sae_id=SaeId(dev_sae),
    )
    d.close()
    return device


def _read_sim(s: Table) -> QkdSimSettings:
    outages = []
    for o in s.tables("outage", Outage):
        outages.append(Outage(o.number("start_s", nonnegative=True), o.number("duration_s")))
        o.close()
    seed = s.optional_integer("seed", lo=0)
    sim = QkdSimSettings(
        rate_multiplier=s.number("rate_multiplier", nonnegative=True),
        seed=seed,
        outages=tuple(outages),
        issued_ttl_s=s.number("issued_ttl_s"),
        arrival_shape=s.number("arrival_shape"),
        initial_keys=s.integer("initial_keys", lo=0),
    )
    s.close()
    return sim


def _check_addresses(file: Path, kmstns: Mapping[NodeId, Kmstn], links: list[Link]) -> None:
    """Two listeners on one host:port would fail at start; say so now."""
    used: dict[tuple[str, int], str] = {}

    def claim(host: str, port: int, what: str) -> None:
        if port == 0:
            return
        other = used.setdefault((host, port), what)
        if other != what:
            raise ConfigError(file, what, f"{host}:{port} is already used by {other}")

    for i, k in enumerate(kmstns.values()):
        claim(k.host, k.etsi014_port, f"kmstn[{i}].etsi014_port")
        claim(k.host, k.etsi020_port, f"kmstn[{i}].etsi020_port")
        claim(k.host, k.relay_port, f"kmstn[{i}].relay_port")
    qi = 0
    for link in links:
        if isinstance(link, QkdLink) and link.alice and link.bob:
            claim(link.alice.host, link.alice.port, f"qkd_link[{qi}].alice.port")
            claim(link.bob.host, link.bob.port, f"qkd_link[{qi}].bob.port")
            qi += 1
