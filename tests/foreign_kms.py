"""A foreign KMS speaking plain ETSI GS QKD 020 V1.1.1, built from the published schema only.

It stands in for another vendor's KMS in the same protected site as a kmstn
node (a site link), for interop tests. It deliberately shares no code with
kmstn: Python's http.server and ssl (OpenSSL 3.0, so TLS 1.3 with classical
groups only), requests for its acks, JSON handled by hand.

Behaviour: asynchronous mode only (it does not advertise synchronous_mode);
``POST /kmapi/v1/ext_keys`` answers 202 and later POSTs an ``ack_containers``
array with status ``relayed`` to the ack_callback_url; ``POST
/kmapi/v1/ext_keys/ack`` records acks it receives; ``GET /test/keys`` lists
what it holds, ``GET /test/acks`` the acks it was sent, ``GET
/test/ack_results`` the answers to the acks it sent, ``GET /test/requests``
every request body it got (test inspection).

    python -m tests.foreign_kms --name F --host 127.0.0.1 --port 8443 \
        --ca ca.pem --cert F.pem --key F.key
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

STATE: dict[str, Any] = {"keys": {}, "acks": [], "ack_results": [], "requests": [],
                         "lock": threading.Lock()}


def problem(status: int, slug: str, key: str, text: str) -> bytes:
    return json.dumps({"type": f"https://qkd.etsi.org/gs020-interop-kms/{slug}",
                       "status": status, "title": slug, "details": {key: text}}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ca = cert = key = ""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json") -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/kmapi/versions":
            self._send(200, json.dumps({"versions": ["v1"]}).encode())
        elif self.path == "/test/keys":
            with STATE["lock"]:
                self._send(200, json.dumps(STATE["keys"]).encode())
        elif self.path == "/test/acks":
            with STATE["lock"]:
                self._send(200, json.dumps(STATE["acks"]).encode())
        elif self.path == "/test/ack_results":
            with STATE["lock"]:
                self._send(200, json.dumps(STATE["ack_results"]).encode())
        elif self.path == "/test/requests":
            with STATE["lock"]:
                self._send(200, json.dumps(STATE["requests"]).encode())
        else:
            self._send(404, problem(404, "not-found", "not_found", self.path))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            doc = json.loads(body)
        except ValueError:
            self._send(400, problem(400, "missing-parameters", "missing_parameters", "not JSON"),
                       "application/problem+json")
            return
        with STATE["lock"]:
            STATE["requests"].append({"path": self.path, "body": doc})
        if self.path == "/kmapi/v1/ext_keys":
            self._ext_keys(doc)
        elif self.path == "/kmapi/v1/ext_keys/ack":
            with STATE["lock"]:
                STATE["acks"].extend(doc if isinstance(doc, list) else [doc])
            self._send(200)
        else:
            self._send(404, problem(404, "not-found", "not_found", self.path),
                       "application/problem+json")

    def _ext_keys(self, doc: dict[str, Any]) -> None:
        missing = [f for f in ("keys", "initiator_sae_id", "target_sae_ids") if f not in doc]
        if missing:
            self._send(400, problem(400, "missing-parameters", "missing_parameters",
                                    f"{missing[0]} is required"), "application/problem+json")
            return
        callback = doc.get("ack_callback_url")
        if not callback:
            # No synchronous_mode here: refuse rather than accept silently.
            self._send(400, problem(400, "missing-parameters", "missing_parameters",
                                    "ack_callback_url is required"),
                       "application/problem+json")
            return
        with STATE["lock"]:
            for k in doc["keys"]:
                STATE["keys"][str(uuid.UUID(k["key_id"]))] = {
                    "value": k["value"], "initiator": doc["initiator_sae_id"],
                    "targets": doc["target_sae_ids"]}
        self._send(202)
        ack = [{"key_id_container": [{"key_id": k["key_id"]} for k in doc["keys"]],
                "ack_status": "relayed", "initiator_sae_id": doc["initiator_sae_id"],
                "target_sae_ids": doc["target_sae_ids"]}]
        threading.Thread(target=self._ack, args=(callback, ack), daemon=True).start()

    def _ack(self, url: str, ack: list[dict[str, Any]]) -> None:
        session = requests.Session()
        session.trust_env = False
        resp = session.post(url, json=ack, cert=(self.cert, self.key), verify=self.ca,
                            timeout=10)
        with STATE["lock"]:
            STATE["ack_results"].append({"url": url, "status": resp.status_code,
                                         "key_ids": [k["key_id"] for a in ack
                                                     for k in a["key_id_container"]]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("name", "host", "ca", "cert", "key"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    Handler.ca, Handler.cert, Handler.key = args.ca, args.cert, args.key
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(json.dumps({"msg": "listening", "name": args.name, "port": args.port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
