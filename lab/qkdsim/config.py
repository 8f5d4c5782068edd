"""The emulator's own file (``sim.toml``) and the launcher's helpers.

``sim.toml`` names the topology, the QKD link this process emulates, the CA
that client certificates must chain to, and each end's server certificate
and key::

    topology = "topology.toml"      # the federation's topology file, or instead
    # node_file = "nodes/KMSTN1/node.toml"  # a per-node file of one end of the link
    link = "QKD-1-2"                # a [[qkd_link]] id in it
    ca = "pki/ca.pem"               # clients must present a certificate from this CA

    [alice]                          # the device KME beside link.a
    cert = "pki/certs/QKD-1-2-alice.pem"   # subject CN must be the end's kme_id
    key = "pki/certs/QKD-1-2-alice.key"

    [bob]                            # the device KME beside link.b
    cert = "pki/certs/QKD-1-2-bob.pem"
    key = "pki/certs/QKD-1-2-bob.key"

    [log]
    level = "info"                   # debug logs every request

    rate_scale = 1.0                 # optional, top level: multiplies the link's rate
                                     # (labs and benchmarks: "the rate not limiting")

Rates, sizes, addresses and fault injection come from the link in the
topology or node file (``[[qkd_link]]`` and ``[qkd_link.sim]``), so the nodes
and the emulator can never disagree about them. Validation is as strict as
``kme.config``: unknown keys, missing files, a certificate whose CN is not
the end's ``kme_id`` or a key that does not match its certificate raise
:class:`ConfigError` naming the field (the process exits 78).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from kme.config import (
    LOG_LEVELS,
    ConfigError,
    DeviceEndpoint,
    QkdLink,
    TlsFiles,
    Topology,
    load_topology,
)
from kme.config.reader import Table, read_toml
from kme.config.topology import read_topology
from kme.identity import common_name_of

__all__ = ["HEALTH_PATH", "SimConfig", "load_sim_config", "server_context", "sim_health",
           "sim_healthy", "write_sim_config"]

HEALTH_PATH = "/healthz"


class _CertPair(Protocol):
    """Anything with ``cert`` and ``key`` paths (lab.pki.Issued, TlsFiles)."""

    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...


@dataclass(frozen=True, slots=True)
class SimConfig:
    source: Path
    topology: Topology
    link: QkdLink
    alice_tls: TlsFiles
    bob_tls: TlsFiles
    log_level: str

    def tls(self, end: str) -> TlsFiles:
        return self.alice_tls if end == "alice" else self.bob_tls

    def device(self, end: str) -> DeviceEndpoint:
        return self.link.device_of(self.link.a if end == "alice" else self.link.b)


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """ETSI 014 clause 2 transport: TLS 1.2 or higher, client certificate required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def _end_tls(root: Table, end: str, ca: Path, device: DeviceEndpoint) -> TlsFiles:
    t = root.table(end)
    if not t.data:
        raise root.error(end, "is required (cert and key of this end's listener)")
    tls = TlsFiles(ca, t.path("cert", must_exist=True), t.path("key", must_exist=True))
    t.close()
    try:
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise t.error("cert", f"not a PEM certificate: {exc}") from None
    cn = common_name_of(cert.public_bytes(Encoding.DER))
    if cn != device.kme_id:
        # ETSI 014 clause 2: an SAE confirms the KME ID from the KME's
        # certificate, so the CN has to be this end's kme_id.
        raise t.error("cert", f"subject CN is {cn!r}; this end's kme_id is {device.kme_id!r}")
    try:
        server_context(tls)
    except (ssl.SSLError, OSError) as exc:
        raise t.error("key", f"cannot load the certificate and key: {exc}") from None
    return tls


def load_sim_config(path: str | Path) -> SimConfig:
    """Read and validate ``sim.toml`` and the topology it names."""
    file = Path(path).resolve()
    root = Table(file, read_toml(file))
    if "node_file" in root.data:
        # A per-node file holds the same [[qkd_link]] tables for its own links;
        # only those are read (the node's own settings are the node's).
        node_path = root.path("node_file", must_exist=True)
        topology = read_topology(node_path, Table(node_path, read_toml(node_path)))
    else:
        topology = load_topology(root.path("topology", must_exist=True))
    link_id = root.text("link")
    qkd = {link.id: link for link in topology.qkd_links}
    if link_id not in qkd:
        known = ", ".join(sorted(qkd)) or "none"
        raise root.error("link", f"{link_id!r} is not a QKD link of the topology "
                                 f"(QKD links: {known})")
    link = qkd[link_id]
    # The emulated devices serve whole bytes only (ETSI 014 clause 4.2), so
    # the default size has to be one.
    if link.key_size % 8:
        raise ConfigError(topology.source, f"qkd_link {link_id} key_size",
                          f"the emulator serves whole bytes; {link.key_size} is not a "
                          "multiple of 8")
    scale = root.number("rate_scale", 1.0, nonnegative=True)
    if scale != 1.0:
        link = dataclasses.replace(link, sim=dataclasses.replace(
            link.sim, rate_multiplier=link.sim.rate_multiplier * scale))
    ca = root.path("ca", must_exist=True)
    alice = _end_tls(root, "alice", ca, link.device_of(link.a))
    bob = _end_tls(root, "bob", ca, link.device_of(link.b))
    lg = root.table("log")
    level = lg.choice("level", LOG_LEVELS, "info")
    lg.close()
    root.close()
    return SimConfig(file, topology, link, alice, bob, level)


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def write_sim_config(path: Path, *, link: str, ca: Path, alice: _CertPair, bob: _CertPair,
                     topology: Path | None = None, node_file: Path | None = None,
                     log_level: str = "info", rate_scale: float = 1.0) -> Path:
    """Write a ``sim.toml`` (used by ``kmstn federation`` and the tests); the link comes
    from ``topology`` or from ``node_file`` (a per-node file of one of its ends)."""
    if (topology is None) == (node_file is None):
        raise ValueError("give a topology or a node file")
    path.parent.mkdir(parents=True, exist_ok=True)
    source = (f"topology = {_toml_str(topology)}" if topology is not None
              else f"node_file = {_toml_str(node_file)}")  # type: ignore[arg-type]
    lines = [
        source,
        f"link = {_toml_str(link)}",
        f"ca = {_toml_str(ca)}",
        f"rate_scale = {float(rate_scale)!r}",
        "",
        "[alice]",
        f"cert = {_toml_str(alice.cert)}",
        f"key = {_toml_str(alice.key)}",
        "",
        "[bob]",
        f"cert = {_toml_str(bob.cert)}",
        f"key = {_toml_str(bob.key)}",
        "",
        "[log]",
        f"level = {_toml_str(log_level)}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def sim_health(device: DeviceEndpoint, ca: Path, cert: _CertPair,
               timeout: float = 2.0) -> dict[str, Any] | None:
    """The emulator's health document (status and key counters), or None if unreachable."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    conn = http.client.HTTPSConnection(device.host, device.port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", HEALTH_PATH)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        with contextlib.suppress(OSError):
            conn.close()
    if resp.status != 200:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _healthz(device: DeviceEndpoint, ca: Path, cert: _CertPair, timeout: float) -> bool:
    doc = sim_health(device, ca, cert, timeout)
    return doc is not None and doc.get("status") == "ok"


def sim_healthy(link: QkdLink, ca: Path, certs: Mapping[str, _CertPair],
                timeout: float = 2.0) -> bool:
    """True once both ends of ``link`` answer ``GET /healthz`` over mutual TLS.

    ``certs`` maps identities to certificates (as ``lab.pki.issue_for_topology``
    returns them); each end is asked with its own device certificate (CN =
    kme_id), which the emulator accepts for /healthz only.
    """
    for device in (link.alice, link.bob):
        if device is None:
            return False
        cert = certs.get(device.kme_id) or certs.get(device.sae_id)
        if cert is None or not _healthz(device, ca, cert, timeout):
            return False
    return True
