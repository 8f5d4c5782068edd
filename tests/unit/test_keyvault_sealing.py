"""Root-secret handling without a TPM: key file, stdin, and the refusals around them."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from keyvault.sealing import SEALED_FILE, obtain_root_secret, parse_hex_key
from kme.config import ConfigError, KeyvaultSettings
from kme.errors import ErrorCode, KmstnError

LOG = logging.getLogger("test.keyvault")
HEX = "00112233445566778899aabbccddeeff" * 2


def test_parse_hex_key() -> None:
    assert parse_hex_key(f"  {HEX}\n").reveal() == bytes.fromhex(HEX)
    for bad in ("", HEX[:-2], HEX + "00", "zz" * 32):
        with pytest.raises(ValueError, match="64 hex characters"):
            parse_hex_key(bad)


def test_key_file_creates_external_marker_and_warns(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "k"
    key_file.write_text(HEX)
    key_file.chmod(0o644)
    settings = KeyvaultSettings(tpm="file", key_file=key_file)
    with caplog.at_level(logging.WARNING):
        root = obtain_root_secret(settings, tmp_path, LOG)
    assert root.secret.reveal() == bytes.fromhex(HEX)
    assert (root.protection, root.created) == ("file", True)
    assert json.loads((tmp_path / SEALED_FILE).read_text()) == {"format": 1,
                                                                "protection": "external"}
    assert (tmp_path / SEALED_FILE).stat().st_mode & 0o777 == 0o600
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "SECURITY WARNING" in messages and "readable by group or others" in messages
    assert HEX not in caplog.text
    assert obtain_root_secret(settings, tmp_path, LOG).created is False


def test_stdin(tmp_path: Path) -> None:
    root = obtain_root_secret(KeyvaultSettings(tpm="stdin"), tmp_path, LOG,
                              stdin=io.StringIO(HEX + "\n"))
    assert (root.protection, root.secret.reveal()) == ("stdin", bytes.fromhex(HEX))
    with pytest.raises(ConfigError) as err:
        obtain_root_secret(KeyvaultSettings(tpm="stdin"), tmp_path, LOG,
                           stdin=io.StringIO("secret-ish text\n"))
    assert "64 hex characters" in str(err.value) and "secret-ish" not in str(err.value)


def test_refusals(tmp_path: Path) -> None:
    # A database without its sealed key: the key is gone, say so.
    (tmp_path / "vault.db").write_bytes(b"x")
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(KeyvaultSettings(tpm="stdin"), tmp_path, LOG, stdin=io.StringIO(HEX))
    assert err.value.code is ErrorCode.SEALED and "does not" in err.value.public
    (tmp_path / "vault.db").unlink()

    # A TPM-sealed vault cannot be opened with a key file, nor by the other TPM.
    (tmp_path / SEALED_FILE).write_text(json.dumps({
        "format": 1, "protection": "tpm", "tpm": "swtpm", "parent": "owner:ecc256:aes128cfb",
        "auth": False, "public": "AA==", "private": "AA=="}))
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(KeyvaultSettings(tpm="stdin"), tmp_path, LOG, stdin=io.StringIO(HEX))
    assert "sealed by the swtpm TPM" in err.value.public
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(KeyvaultSettings(tpm="device", tpm_device=tmp_path / "tpmrm0"),
                           tmp_path, LOG)
    assert "sealed by the swtpm TPM, but keyvault.tpm = 'device'" in err.value.public
    # ... and one sealed without an auth value refuses an auth file (and vice versa).
    auth = tmp_path / "auth"
    auth.write_text("x")
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(KeyvaultSettings(tpm="swtpm", tpm_auth_file=auth), tmp_path, LOG)
    assert "sealed without a TPM auth value" in err.value.public

    # A damaged sealed-key file is reported as such.
    (tmp_path / SEALED_FILE).write_text("{not json")
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(KeyvaultSettings(tpm="swtpm"), tmp_path, LOG)
    assert "damaged" in err.value.public


def test_hardware_tpm_required_but_absent(tmp_path: Path) -> None:
    settings = KeyvaultSettings(tpm="device", tpm_device=tmp_path / "no-tpmrm0")
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(settings, tmp_path, LOG)
    assert err.value.code is ErrorCode.SEALED
    assert "no-tpmrm0 is not present" in err.value.public
