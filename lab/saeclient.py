"""An ETSI 014 SAE client over a federation manifest (``kmstn sae``, benchmarks, the demo).

It keeps one mutual-TLS connection alive (``http.client``; one client per
thread) and reconnects once if the server closed an idle connection. It is
deliberately lean: the benchmarks measure the KMSTN, not the client, and
``requests`` spends about a millisecond of CPU per call on a small machine.
It reads no proxy or CA settings from the environment.
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["SaeClient"]


class SaeClient:
    """One SAE: its certificate, and the ETSI 014 URL of the KMSTN that serves it."""

    def __init__(self, sae_id: str, base_url: str, cert: str, key: str, ca: str,
                 timeout: float = 30.0) -> None:
        self.sae_id = sae_id
        self.base_url = base_url
        parts = urlsplit(base_url)
        self._host, self._port = parts.hostname or "", parts.port or 443
        self._ctx = ssl.create_default_context(cafile=ca)
        self._ctx.check_hostname = False  # the KMSTN is identified by its certificate chain
        self._ctx.load_cert_chain(cert, key)
        self._timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None
        # The headers of the last answer (Retry-After, X-Request-ID).
        self.last_headers: dict[str, str] = {}

    @classmethod
    def from_manifest(cls, manifest_path: Path | dict[str, Any], sae_id: str,
                      timeout: float = 30.0) -> SaeClient:
        manifest = (json.loads(manifest_path.read_text()) if isinstance(manifest_path, Path)
                    else manifest_path)
        entry = next((s for s in manifest["saes"] if s["id"] == sae_id), None)
        if entry is None:
            raise SystemExit(f"SAE {sae_id!r} is not in the federation manifest")
        url = next(k["etsi014_url"] for k in manifest["kmstns"] if k["id"] == entry["kmstn"])
        return cls(sae_id, url, entry["cert"], entry["key"], manifest["ca"], timeout)

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(self._host, self._port,
                                                         timeout=self._timeout,
                                                         context=self._ctx)
            try:
                self._conn.request(method, path, body=data, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError,
                    ssl.SSLEOFError,  # TLS's word for a peer that closed the connection
                    ssl.SSLZeroReturnError):
                self.close()
                if attempt == 1 and not fresh:
                    continue  # the server closed an idle keep-alive connection
                raise
            self.last_headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            try:
                return resp.status, json.loads(raw) if raw else {}
            except ValueError:
                return resp.status, {"message": raw.decode("utf-8", "replace")}
        raise AssertionError("unreachable")

    def status(self, slave: str) -> tuple[int, Any]:
        return self._request("GET", f"/api/v1/keys/{quote(slave, safe='')}/status")

    def enc_keys(self, slave: str, number: int = 1, size: int | None = None,
                 additional: list[str] | None = None) -> tuple[int, Any]:
        body: dict[str, Any] = {"number": number}
        if size:
            body["size"] = size
        if additional:
            body["additional_slave_SAE_IDs"] = additional
        return self._request("POST", f"/api/v1/keys/{quote(slave, safe='')}/enc_keys", body)

    def dec_keys(self, master: str, key_ids: list[str]) -> tuple[int, Any]:
        return self._request("POST", f"/api/v1/keys/{quote(master, safe='')}/dec_keys",
                             {"key_IDs": [{"key_ID": k} for k in key_ids]})

    def get(self, path: str) -> tuple[int, Any]:
        return self._request("GET", path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
