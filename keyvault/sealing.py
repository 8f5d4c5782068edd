"""The vault's root secret: created once, sealed by a TPM, unsealed once at start.

At the first start a random 256-bit root secret is made and sealed by the
TPM as a keyed-hash object under the owner hierarchy's ECC P-256 storage
primary (the tpm2-tools default template, recreated at every start, so
nothing is kept in TPM NV). The object's public and private parts go to
``sealed-key.json`` in the vault directory. The private part is encrypted by
the TPM with a key derived from that TPM's owner seed, so the file alone, or
the file with the database on a machine with another TPM, opens nothing:
``TPM2_Load`` fails its integrity check, and we say so plainly.

Which TPM (``keyvault.tpm``):

- ``auto``: the hardware resource manager (``tpm_device``, /dev/tpmrm0) if
  present, else swtpm. Once a vault exists, auto keeps using the TPM that
  sealed it (recorded in sealed-key.json).
- ``device`` / ``swtpm``: exactly that one.
- ``file`` / ``stdin``: no TPM; the root secret (64 hex characters) is read
  from ``key_file`` or from standard input.

An emulated TPM and a key from a file or stdin protect the key against
copying the database alone and nothing more (root reads the emulator's state
or the key file): both log a loud warning at every start.

The secret is unsealed once, at start, never per request: a hardware TPM
takes tens of milliseconds per command. The TPM commands themselves (and
their encrypted sessions) are :mod:`keyvault.tpm`.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from keyvault.records import ROOT_SECRET_BYTES
from keyvault.tpm import PARENT, TpmKind, open_tpm, sealed_error
from kme.config import ConfigError, KeyvaultSettings
from kme.types import SecretBytes

__all__ = [
    "SEALED_FILE",
    "RootSecret",
    "obtain_root_secret",
    "parse_hex_key",
]

SEALED_FILE: Final = "sealed-key.json"
DB_FILE: Final = "vault.db"
_FORMAT: Final = 1

_EMULATED_WARNING: Final = (
    "SECURITY WARNING: the key vault's database key is protected by an EMULATED TPM "
    "(swtpm) whose state is a file on this machine. This protects nothing against root "
    "or anyone who can read the data directory; it only stops the database file alone "
    "from being opened elsewhere. Use a hardware TPM (/dev/tpmrm0) in production."
)
_EXTERNAL_WARNING: Final = (
    "SECURITY WARNING: the key vault's database key is read from a {source}, not sealed "
    "by a TPM. Whoever can read that {source} can open the database. Use a hardware TPM "
    "(/dev/tpmrm0) in production."
)


@dataclass(frozen=True, slots=True)
class RootSecret:
    """The unsealed root secret and how it was obtained."""

    secret: SecretBytes
    protection: Literal["device", "swtpm", "file", "stdin"]
    created: bool  # True at the first start: made and sealed just now
    seconds: float  # time spent starting the TPM and sealing or unsealing


def parse_hex_key(text: str) -> SecretBytes:
    """A 256-bit key as 64 hex characters (surrounding whitespace ignored)."""
    value = text.strip()
    if len(value) != 2 * ROOT_SECRET_BYTES:
        raise ValueError(f"must be {2 * ROOT_SECRET_BYTES} hex characters")
    try:
        return SecretBytes(bytes.fromhex(value))
    except ValueError:
        raise ValueError(f"must be {2 * ROOT_SECRET_BYTES} hex characters") from None


# -- the sealed-key file ------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise sealed_error(f"{path} is unreadable or damaged", cause=str(exc)) from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get(
            "protection") not in ("tpm", "external"):
        raise sealed_error(f"{path} is not a kmstn sealed-key file (format {_FORMAT})")
    if data["protection"] == "tpm" and (
            data.get("tpm") not in ("device", "swtpm") or data.get("parent") != PARENT
            or not isinstance(data.get("public"), str) or not isinstance(data.get("private"), str)):
        raise sealed_error(f"{path} is damaged (fields missing)")
    return data


def _write_meta(path: Path, data: dict[str, Any]) -> None:
    """Write atomically and durably: a half-written sealed key loses the vault."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- the one entry point ------------------------------------------------------------------


def _read_auth(settings: KeyvaultSettings) -> SecretBytes | None:
    if settings.tpm_auth_file is None:
        return None
    try:
        raw = settings.tpm_auth_file.read_bytes()
    except OSError as exc:
        raise ConfigError(settings.tpm_auth_file, "keyvault.tpm_auth_file",
                          f"cannot read: {exc.strerror}") from None
    if not raw.strip():
        raise ConfigError(settings.tpm_auth_file, "keyvault.tpm_auth_file", "is empty")
    # TPM2B_AUTH holds at most one digest of the object's name algorithm
    # (SHA-256 here): hashing gives any file content that fixed size.
    return SecretBytes(hashlib.sha256(raw.strip()).digest())


def _read_external(settings: KeyvaultSettings, stdin: TextIO, log: logging.Logger
                   ) -> SecretBytes:
    if settings.tpm == "file":
        path = settings.key_file
        if path is None:  # config validation already requires it
            raise ConfigError("node file", "keyvault.key_file", 'is required when tpm = "file"')
        try:
            text = path.read_text()
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, "keyvault.key_file", f"cannot read: {exc}") from None
        if mode & 0o077:
            log.warning("the key file is readable by group or others",
                        extra={"key_file": str(path), "mode": oct(mode & 0o777)})
        try:
            return parse_hex_key(text)
        except ValueError as exc:
            raise ConfigError(path, "keyvault.key_file", str(exc)) from None
    if stdin.isatty():
        text = getpass.getpass("kmstn-keyvault: vault key (64 hex characters): ")
    else:
        text = stdin.readline()
    try:
        return parse_hex_key(text)
    except ValueError as exc:
        raise ConfigError("stdin", "keyvault key", str(exc)) from None


def _choose_tpm(settings: KeyvaultSettings, meta: dict[str, Any] | None) -> TpmKind:
    mode = settings.tpm
    sealed_by: TpmKind | None = meta["tpm"] if meta else None
    if mode == "auto":
        if sealed_by is not None:
            kind: TpmKind = sealed_by
        elif settings.tpm_device.exists():
            kind = "device"
        else:
            kind = "swtpm"
    else:
        kind = "device" if mode == "device" else "swtpm"
        if sealed_by is not None and sealed_by != kind:
            raise sealed_error(f"this vault's key is sealed by the {sealed_by} TPM, but "
                                f"keyvault.tpm = {mode!r}")
    if kind == "device" and not settings.tpm_device.exists():
        raise sealed_error(f"the TPM device {settings.tpm_device} is not present"
                            + (" but this vault's key is sealed by it" if sealed_by else ""))
    return kind


def obtain_root_secret(settings: KeyvaultSettings, vault_dir: Path, log: logging.Logger,
                       stdin: TextIO | None = None) -> RootSecret:
    """Unseal (or, at the first start, create and seal) the vault's root secret.

    Every failure is a KmstnError (SEALED, UNAVAILABLE) or a ConfigError with
    a message an operator can act on; the process exits non-zero, no traceback.
    """
    started = time.perf_counter()
    meta_path = vault_dir / SEALED_FILE
    meta = _read_meta(meta_path)
    if meta is None and (vault_dir / DB_FILE).exists():
        raise sealed_error(f"{vault_dir / DB_FILE} exists but {meta_path} does not: the "
                            "database key is gone and the vault cannot be opened")

    if settings.tpm in ("file", "stdin"):
        if meta is not None and meta["protection"] == "tpm":
            raise sealed_error(f"this vault's key is sealed by the {meta['tpm']} TPM; "
                                f"keyvault.tpm = {settings.tpm!r} cannot open it")
        secret = _read_external(settings, stdin or sys.stdin, log)
        source = "key file" if settings.tpm == "file" else "standard input"
        _loud(log, _EXTERNAL_WARNING.format(source=source), settings.tpm)
        if meta is None:
            _write_meta(meta_path, {"format": _FORMAT, "protection": "external"})
        return RootSecret(secret, settings.tpm, meta is None,
                          time.perf_counter() - started)

    if meta is not None and meta["protection"] == "external":
        raise sealed_error("this vault's key is read from a file or stdin, not a TPM; set "
                            "keyvault.tpm to \"file\" or \"stdin\"")
    kind = _choose_tpm(settings, meta)
    auth = _read_auth(settings)
    if meta is not None and bool(meta.get("auth")) != (auth is not None):
        raise sealed_error(
            "this vault's key was sealed with a TPM auth value; set keyvault.tpm_auth_file"
            if meta.get("auth") else
            "this vault's key was sealed without a TPM auth value, but "
            "keyvault.tpm_auth_file is set")
    if kind == "swtpm":
        _loud(log, _EMULATED_WARNING, "swtpm")
    with open_tpm(kind, settings, vault_dir, log) as tpm:
        if meta is None:
            secret = SecretBytes(secrets.token_bytes(ROOT_SECRET_BYTES))
            public, private = tpm.seal(secret, auth)
            _write_meta(meta_path, {
                "format": _FORMAT, "protection": "tpm", "tpm": kind, "parent": PARENT,
                "auth": auth is not None,
                "public": base64.b64encode(public).decode(),
                "private": base64.b64encode(private).decode(),
            })
            # Read it back through the TPM once: a seal that cannot be
            # unsealed must fail now, before any key is stored under it.
            check = tpm.unseal(public, private, auth)
            if check != secret:
                raise sealed_error("the TPM returned a different secret than it sealed")
        else:
            secret = tpm.unseal(base64.b64decode(meta["public"]),
                                base64.b64decode(meta["private"]), auth)
    if len(secret) != ROOT_SECRET_BYTES:
        raise sealed_error("the unsealed database key has the wrong length")
    return RootSecret(secret, kind, meta is None, time.perf_counter() - started)


def _loud(log: logging.Logger, message: str, protection: str) -> None:
    log.warning(message, extra={"security": "degraded", "protection": protection})
    # Also in plain words on a terminal, for an operator starting it by hand;
    # under systemd or the lab launcher stderr is the log, and that is JSON.
    if sys.stderr.isatty():
        print(f"kmstn-keyvault: {message}", file=sys.stderr, flush=True)
