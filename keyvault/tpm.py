"""The TPM commands the vault needs: seal and unseal one secret (tpm2-pytss ESAPI).

The sealed object is a keyed-hash object under the owner hierarchy's ECC
P-256 storage primary (:data:`PARENT`, the tpm2-tools default template,
recreated at every start, so nothing is kept in TPM NV). Commands that carry
the secret use a salted HMAC session with AES-128-CFB parameter encryption,
so the secret and the auth value do not cross the TPM bus in clear.
:func:`open_tpm` gives the hardware resource manager or a private swtpm
that lives only for the one unseal. The policy around it (which TPM, the
sealed-key file, warnings) is :mod:`keyvault.sealing`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal

from keyvault.swtpm import SwtpmProcess
from kme.config import KeyvaultSettings
from kme.errors import ErrorCode, KmstnError
from kme.types import SecretBytes

__all__ = ["PARENT", "Tpm", "TpmKind", "open_tpm", "sealed_error"]

PARENT: Final = "owner:ecc256:aes128cfb"

TpmKind = Literal["device", "swtpm"]


def sealed_error(public: str, cause: str | None = None) -> KmstnError:
    return KmstnError(ErrorCode.SEALED, public, cause=cause)


class Tpm:
    """The few TPM2 commands we need, via tpm2-pytss ESAPI."""

    def __init__(self, tcti_name: str, tcti_conf: str) -> None:
        from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception

        try:
            self.ectx = ESAPI(TCTILdr(tcti_name, tcti_conf))
        except TSS2_Exception as exc:
            raise sealed_error(f"cannot talk to the TPM ({tcti_name}:{tcti_conf})",
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
            PARENT.split(":", 1)[1],
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
                raise sealed_error(
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
                    raise sealed_error(
                        "the TPM refused the auth value for the sealed database key "
                        "(keyvault.tpm_auth_file)", cause=str(exc)) from None
                raise sealed_error("the TPM could not unseal the database key",
                                    cause=f"TPM2_Unseal: {exc}") from None
            finally:
                self.ectx.flush_context(session)
                self.ectx.flush_context(handle)
        finally:
            self.ectx.flush_context(primary)
        return SecretBytes(bytes(data))


@contextmanager
def open_tpm(kind: TpmKind, settings: KeyvaultSettings, vault_dir: Path,
             log: logging.Logger) -> Iterator[Tpm]:
    if kind == "device":
        tpm = Tpm("device", str(settings.tpm_device))
        try:
            yield tpm
        finally:
            tpm.close(shutdown=False)  # the OS owns a hardware TPM's power cycle
        return
    # The emulator is needed only for this one unseal: it is stopped as soon
    # as the secret is out, so no TPM socket stays open while we serve.
    with SwtpmProcess(vault_dir / "swtpm", log) as emulator:
        tpm = Tpm(*emulator.tcti)
        try:
            yield tpm
        finally:
            tpm.close(shutdown=True)
