"""A small ETSI 014 SAE client for tests: requests with the SAE's own certificate."""

from __future__ import annotations

import base64
import ssl
from typing import Any

import requests
from requests.adapters import HTTPAdapter


class _Tls12Adapter(HTTPAdapter):
    def __init__(self, version: ssl.TLSVersion, **kw: Any) -> None:
        self._version = version
        super().__init__(**kw)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        ctx = ssl.create_default_context()
        ctx.minimum_version = self._version
        ctx.maximum_version = self._version
        kwargs["ssl_context"] = ctx
        super().init_poolmanager(*args, **kwargs)


class Sae:
    def __init__(self, manifest: dict[str, Any], sae_id: str,
                 tls_version: ssl.TLSVersion | None = None) -> None:
        entry = next(s for s in manifest["saes"] if s["id"] == sae_id)
        self.id = sae_id
        self.kmstn = entry["kmstn"]
        self.base = next(k["etsi014_url"] for k in manifest["kmstns"] if k["id"] == self.kmstn)
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = manifest["ca"]
        self.session.cert = (entry["cert"], entry["key"])
        if tls_version is not None:
            self.session.mount("https://", _Tls12Adapter(tls_version))

    def at(self, kmstn_id: str, manifest: dict[str, Any]) -> Sae:
        """The same SAE credentials pointed at another KMSTN (wrong-KMSTN tests)."""
        self.base = next(k["etsi014_url"] for k in manifest["kmstns"] if k["id"] == kmstn_id)
        return self

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(self.base + path, params=params, timeout=30)

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> requests.Response:
        if raw is not None:
            return self.session.post(self.base + path, data=raw, timeout=30,
                                     headers={"Content-Type": "application/json"})
        return self.session.post(self.base + path, json=body, timeout=30)

    def enc_keys(self, slave: str, **body: Any) -> requests.Response:
        return self.post(f"/api/v1/keys/{slave}/enc_keys", body)

    def dec_keys(self, master: str, key_ids: list[str]) -> requests.Response:
        return self.post(f"/api/v1/keys/{master}/dec_keys",
                         {"key_IDs": [{"key_ID": k} for k in key_ids]})

    def status(self, slave: str) -> requests.Response:
        return self.get(f"/api/v1/keys/{slave}/status")


def key_map(resp: requests.Response) -> dict[str, bytes]:
    assert resp.status_code == 200, resp.text
    return {k["key_ID"]: base64.b64decode(k["key"]) for k in resp.json()["keys"]}
