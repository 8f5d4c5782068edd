"""An ETSI 014 SAE client over a federation manifest (``kmstn sae``, benchmarks, the demo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

__all__ = ["SaeClient"]


class SaeClient:
    """One SAE: its certificate, and the ETSI 014 URL of the KMSTN that serves it."""

    def __init__(self, sae_id: str, base_url: str, cert: str, key: str, ca: str) -> None:
        self.sae_id = sae_id
        self.base_url = base_url
        self.session = requests.Session()
        self.session.trust_env = False  # the machine may set REQUESTS_CA_BUNDLE
        self.session.verify = ca
        self.session.cert = (cert, key)

    @classmethod
    def from_manifest(cls, manifest_path: Path | dict[str, Any], sae_id: str) -> SaeClient:
        manifest = (json.loads(manifest_path.read_text()) if isinstance(manifest_path, Path)
                    else manifest_path)
        entry = next((s for s in manifest["saes"] if s["id"] == sae_id), None)
        if entry is None:
            raise SystemExit(f"SAE {sae_id!r} is not in the federation manifest")
        url = next(k["etsi014_url"] for k in manifest["kmstns"] if k["id"] == entry["kmstn"])
        return cls(sae_id, url, entry["cert"], entry["key"], manifest["ca"])

    def _answer(self, resp: requests.Response) -> tuple[int, Any]:
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, {"message": resp.text}

    def status(self, slave: str) -> tuple[int, Any]:
        return self._answer(self.session.get(
            f"{self.base_url}/api/v1/keys/{slave}/status", timeout=30))

    def enc_keys(self, slave: str, number: int = 1, size: int | None = None,
                 additional: list[str] | None = None) -> tuple[int, Any]:
        body: dict[str, Any] = {"number": number}
        if size:
            body["size"] = size
        if additional:
            body["additional_slave_SAE_IDs"] = additional
        return self._answer(self.session.post(
            f"{self.base_url}/api/v1/keys/{slave}/enc_keys", json=body, timeout=30))

    def dec_keys(self, master: str, key_ids: list[str]) -> tuple[int, Any]:
        return self._answer(self.session.post(
            f"{self.base_url}/api/v1/keys/{master}/dec_keys",
            json={"key_IDs": [{"key_ID": k} for k in key_ids]}, timeout=30))

    def close(self) -> None:
        self.session.close()
