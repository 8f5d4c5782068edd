"""The node's REST edge: ETSI 014 to SAEs and ETSI 020 to peer KMSTNs.

Two listeners per node, each its own process:

- ``python -m gateway --api etsi014``: northbound ETSI GS QKD 014 for SAEs,
  Flask under Gunicorn (gthread workers, keep-alive), mutual TLS 1.2+ with
  Python's ssl; the SAE ID is the subject CN of the verified client
  certificate, never the URL or body.
- ``python -m gateway --api etsi020``: horizontal ETSI GS QKD 020 for peer
  KMSTNs, the same Flask app factory under cheroot with pyOpenSSL, because
  only pyOpenSSL (cryptography's OpenSSL 4) negotiates TLS 1.3 with the
  hybrid group X25519MLKEM768 (kme/pqtls.py).

In front of both, the edge (gateway/edge.py, gateway/http1.py): one loop per
listener process does the TLS handshakes and reads every request whole,
under deadlines and connection caps, so a slow or hostile client never
holds a request worker; every request refused there gets the API's own
error (gateway/errors.py).

Views stay thin: authenticate, parse with kme.etsi014 / kme.etsi020, call
kme.flows, render. Every HTTP status is decided in gateway/errors.py.
"""
