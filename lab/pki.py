"""A throwaway certificate authority for labs, tests and the demo.

``kmstn pki`` uses this to issue one certificate per KMSTN, device KME and
SAE of a topology. Identities follow one rule across kmstn: the subject
common name (CN) is the SAE, node or KME ID; server certificates also carry
the listener's IP address (or DNS name) as a subjectAltName.

Real deployments bring their own PKI: point the node file's ``[tls]`` at
certificates whose CN is the node ID, issued by a CA every peer trusts.
Keys are ECDSA P-256 (fast handshakes) and written with mode 0600.

Link state has its own authority (:class:`LinkStateAuthority`): an ML-DSA-65
CA that issues each KMSTN an ML-DSA-65 certificate (CN = node ID) for signing
its link-state records, so nothing classical authenticates link state.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kme.config import Topology

__all__ = ["CertificateAuthority", "Issued", "LinkStateAuthority", "issue_for_topology"]


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class CertificateAuthority:
    """A CA kept as ``ca.pem`` and ``ca.key`` in one directory."""

    def __init__(self, directory: Path, cert: x509.Certificate,
                 key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.cert = cert
        self._key = key

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path, name: str = "kmstn throwaway CA",
               days: int = 365) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / "ca.key", key)
        return cls(directory, cert, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'ca.key'} is not an EC key")
        return cls(directory, cert, key)

    def issue(
        self,
        common_name: str,
        out_dir: Path | None = None,
        *,
        ips: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        days: int = 365,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        """Issue a certificate usable as TLS client and server for ``common_name``."""
        out = out_dir or self.directory
        out.mkdir(parents=True, exist_ok=True)
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        sans += [x509.DNSName(d) for d in dns]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                       ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = _safe_filename(common_name)
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return Issued(cert_path, key_path)


def issue_for_topology(ca: CertificateAuthority, topology: Topology, out_dir: Path,
                       days: int = 365) -> dict[str, Issued]:
    """Certificates for every KMSTN, device KME and SAE of a topology, by identity.

    KMSTN: CN = node ID, SAN = its host. Device KME: CN = kme_id, SAN = the
    device's host. SAE: CN = SAE ID (client only in practice). Existing files
    are kept, so running this twice issues nothing new.
    """
    wanted: dict[str, tuple[str, ...]] = {}
    for node in topology.kmstns.values():
        wanted[node.id] = (node.host,)
    for link in topology.qkd_links:
        for end in (link.alice, link.bob):
            if end is not None:
                wanted[end.kme_id] = (end.host,)
    for sae in topology.saes:
        wanted.setdefault(sae, ())
    issued = {}
    for name, hosts in wanted.items():
        stem = _safe_filename(name)
        cert, key = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
        if cert.exists() and key.exists():
            issued[name] = Issued(cert, key)
            continue
        ips = tuple(h for h in hosts if _is_ip(h))
        dns = tuple(h for h in hosts if not _is_ip(h))
        issued[name] = ca.issue(name, out_dir, ips=ips, dns=dns, days=days)
    return issued


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class LinkStateAuthority:
    """The federation's link-state CA: ML-DSA-65 keys and signatures throughout.

    Kept as ``ca.pem`` / ``ca.key`` in its own directory; issues
    ``<node>.pem`` / ``<node>.key`` (ML-DSA-65, PKCS#8, mode 0600), CN = node ID,
    digital signature only. Existing files are kept, so issuing twice issues
    nothing new.
    """

    def __init__(self, directory: Path, cert: x509.Certificate,
                 key: mldsa.MLDSA65PrivateKey) -> None:
        self.directory = directory
        self.cert = cert
        self._key = key

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path, name: str = "kmstn link-state CA",
               days: int = 365) -> LinkStateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = mldsa.MLDSA65PrivateKey.generate()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, None)
        )
        (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / "ca.key", key)
        return cls(directory, cert, key)

    @classmethod
    def load_or_create(cls, directory: Path) -> LinkStateAuthority:
        if not (directory / "ca.pem").exists():
            return cls.create(directory)
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(key, mldsa.MLDSA65PrivateKey):
            raise ValueError(f"{directory / 'ca.key'} is not an ML-DSA-65 key")
        return cls(directory, cert, key)

    def issue(self, node: str, days: int = 365) -> Issued:
        """``node``'s link-state certificate and key (kept if already issued)."""
        stem = _safe_filename(node)
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        if cert_path.exists() and key_path.exists():
            return Issued(cert_path, key_path)
        key = mldsa.MLDSA65PrivateKey.generate()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(self._key, None)
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return Issued(cert_path, key_path)
