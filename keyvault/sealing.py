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
takes tens of milliseconds per command. Commands that carry the secret use a
salted HMAC session with AES-128-CFB parameter encryption, so the secret and
the auth value do not cross the TPM bus in clear.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from keyvault.records import ROOT_SECRET_BYTES
from keyvault.swtpm import SwtpmProcess
from kme.config import ConfigError, KeyvaultSettings
from kme.errors import ErrorCode, KmstnError
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
_PARENT: Final = "owner:ecc256:aes128cfb"

TpmKind = Literal["device", "swtpm"]

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


def _sealed_error(public: str, cause: str | None = None) -> KmstnError:
    return KmstnError(ErrorCode.SEALED, public, cause=cause)


# -- the sealed-key file ------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _sealed_error(f"{path} is unreadable or damaged", cause=str(exc)) from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get(
            "protection") not in ("tpm", "external"):
        raise _sealed_error(f"{path} is not a kmstn sealed-key file (format {_FORMAT})")
    if data["protection"] == "tpm" and (
            data.get("tpm") not in ("device", "swtpm") or data.get("parent") != _PARENT
            or not isinstance(data.get("public"), str) or not isinstance(data.get("private"), str)):
        raise _sealed_error(f"{path} is damaged (fields missing)")
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


# -- TPM operations ---------------------------------------------------------------------


class _Tpm:
    """The few TPM2 commands we need, via tpm2-pytss ESAPI."""

    def __init__(self, tcti_name: str, tcti_conf: str) -> None:
        from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception

        try:
            self.ectx = ESAPI(TCTILdr(tcti_name, tcti_conf))
        except TSS2_Exception as exc:
            raise _sealed_error(f"cannot talk to the TPM ({tcti_name}:{tcti_conf})",
                                cause=str(exc)) from None

    def close(self, shutdown: bool) -> None:
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import TPM2_SU

        try:
            if shutdown:
                # Orderly shutdown for our own emulator, which stops right after.
                self.ectx.shutdown(TPM2_SU.CLEAR)
        except TSS2_Exception:
            pass
        finally:
            self.ectx.close()

    def _primary(self) -> Any:
        from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

        template = TPM2B_PUBLIC.parse(
            _PARENT.split(":", 1)[1],
            objectAttributes=TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS)
        handle, *_ = self.ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
        return handle

    def _session(self, primary: Any, attributes: int) -> Any:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_SESSION
        from tpm2_pytss.types import TPMT_SYM_DEF, TPMU_SYM_KEY_BITS, TPMU_SYM_MODE

        sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                           mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
        session = self.ectx.start_auth_session(
            tpm_key=primary, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC, symmetric=sym,
            auth_hash=TPM2_ALG.SHA256)
        self.ectx.trsess_set_attributes(session, attributes | TPMA_SESSION.CONTINUESESSION)
        return session

    def seal(self, secret: SecretBytes, auth: SecretBytes | None) -> tuple[bytes, bytes]:
        from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT, TPMA_SESSION
        from tpm2_pytss.types import (
            TPM2B_AUTH,
            TPM2B_PUBLIC,
            TPM2B_SENSITIVE_CREATE,
            TPM2B_SENSITIVE_DATA,
            TPMS_SENSITIVE_CREATE,
            TPMT_PUBLIC,
        )

        primary = self._primary()
        # fixedTPM/fixedParent: the object can never be duplicated to another
        # TPM. noDA: a crash (non-orderly shutdown) must not lock the vault
        # out through dictionary-attack accounting; the auth value, when used,
        # is a high-entropy file, not a password.
        attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                 | TPMA_OBJECT.NODA)
        public = TPM2B_PUBLIC(TPMT_PUBLIC(type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
                                          objectAttributes=attrs))
        public.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(
            userAuth=TPM2B_AUTH(auth.reveal() if auth else b""),
            data=TPM2B_SENSITIVE_DATA(secret.reveal())))
        session = self._session(primary, TPMA_SESSION.DECRYPT)
        try:
            private, out_public, *_ = self.ectx.create(primary, sensitive, public,
                                                       session1=session)
        finally:
            self.ectx.flush_context(session)
            self.ectx.flush_context(primary)
        return bytes(out_public.marshal()), bytes(private.marshal())

    def unseal(self, public: bytes, private: bytes, auth: SecretBytes | None) -> SecretBytes:
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import TPM2_RC, TPMA_SESSION
        from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

        primary = self._primary()
        try:
            try:
                handle = self.ectx.load(primary, TPM2B_PRIVATE.unmarshal(private)[0],
                                        TPM2B_PUBLIC.unmarshal(public)[0])
            except TSS2_Exception as exc:
                raise _sealed_error(
                    "the sealed database key cannot be opened by this TPM: the data directory "
                    "was sealed by another TPM (copied from another machine, or this TPM's "
                    "state was cleared or replaced). The vault stays closed.",
                    cause=f"TPM2_Load: {exc}") from None
            if auth:
                self.ectx.tr_set_auth(handle, auth.reveal())
            session = self._session(primary, TPMA_SESSION.ENCRYPT)
            try:
                data = self.ectx.unseal(handle, session1=session)
            except TSS2_Exception as exc:
                if exc.error in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
                    raise _sealed_error(
                        "the TPM refused the auth value for the sealed database key "
                        "(keyvault.tpm_auth_file)", cause=str(exc)) from None
                raise _sealed_error("the TPM could not unseal the database key",
                                    cause=f"TPM2_Unseal: {exc}") from None
            finally:
                self.ectx.flush_context(session)
                self.ectx.flush_context(handle)
        finally:
            self.ectx.flush_context(primary)
        return SecretBytes(bytes(data))


@contextmanager
def _tpm(kind: TpmKind, settings: KeyvaultSettings, vault_dir: Path,
         log: logging.Logger) -> Iterator[_Tpm]:
    if kind == "device":
        tpm = _Tpm("device", str(settings.tpm_device))
        try:
            yield tpm
        finally:
            tpm.close(shutdown=False)  # the OS owns a hardware TPM's power cycle
        return
    # The emulator is needed only for this one unseal: it is stopped as soon
    # as the secret is out, so no TPM socket stays open while we serve.
    with SwtpmProcess(vault_dir / "swtpm", log) as emulator:
        tpm = _Tpm(*emulator.tcti)
        try:
            yield tpm
        finally:
            tpm.close(shutdown=True)


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
            raise _sealed_error(f"this vault's key is sealed by the {sealed_by} TPM, but "
                                f"keyvault.tpm = {mode!r}")
    if kind == "device" and not settings.tpm_device.exists():
        raise _sealed_error(f"the TPM device {settings.tpm_device} is not present"
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
        raise _sealed_error(f"{vault_dir / DB_FILE} exists but {meta_path} does not: the "
                            "database key is gone and the vault cannot be opened")

    if settings.tpm in ("file", "stdin"):
        if meta is not None and meta["protection"] == "tpm":
            raise _sealed_error(f"this vault's key is sealed by the {meta['tpm']} TPM; "
                                f"keyvault.tpm = {settings.tpm!r} cannot open it")
        secret = _read_external(settings, stdin or sys.stdin, log)
        source = "key file" if settings.tpm == "file" else "standard input"
        _loud(log, _EXTERNAL_WARNING.format(source=source), settings.tpm)
        if meta is None:
            _write_meta(meta_path, {"format": _FORMAT, "protection": "external"})
        return RootSecret(secret, settings.tpm, meta is None,
                          time.perf_counter() - started)

    if meta is not None and meta["protection"] == "external":
        raise _sealed_error("this vault's key is read from a file or stdin, not a TPM; set "
                            "keyvault.tpm to \"file\" or \"stdin\"")
    kind = _choose_tpm(settings, meta)
    auth = _read_auth(settings)
    if meta is not None and bool(meta.get("auth")) != (auth is not None):
        raise _sealed_error(
            "this vault's key was sealed with a TPM auth value; set keyvault.tpm_auth_file"
            if meta.get("auth") else
            "this vault's key was sealed without a TPM auth value, but "
            "keyvault.tpm_auth_file is set")
    if kind == "swtpm":
        _loud(log, _EMULATED_WARNING, "swtpm")
    with _tpm(kind, settings, vault_dir, log) as tpm:
        if meta is None:
            secret = SecretBytes(secrets.token_bytes(ROOT_SECRET_BYTES))
            public, private = tpm.seal(secret, auth)
            _write_meta(meta_path, {
                "format": _FORMAT, "protection": "tpm", "tpm": kind, "parent": _PARENT,
                "auth": auth is not None,
                "public": base64.b64encode(public).decode(),
                "private": base64.b64encode(private).decode(),
            })
            # Read it back through the TPM once: a seal that cannot be
            # unsealed must fail now, before any key is stored under it.
            check = tpm.unseal(public, private, auth)
            if check != secret:
                raise _sealed_error("the TPM returned a different secret than it sealed")
        else:
            secret = tpm.unseal(base64.b64decode(meta["public"]),
                                base64.b64decode(meta["private"]), auth)
    if len(secret) != ROOT_SECRET_BYTES:
        raise _sealed_error("the unsealed database key has the wrong length")
    return RootSecret(secret, kind, meta is None, time.perf_counter() - started)


def _loud(log: logging.Logger, message: str, protection: str) -> None:
    log.warning(message, extra={"security": "degraded", "protection": protection})
    # Also in plain words on a terminal, for an operator starting it by hand;
    # under systemd or the lab launcher stderr is the log, and that is JSON.
    if sys.stderr.isatty():
        print(f"kmstn-keyvault: {message}", file=sys.stderr, flush=True)
