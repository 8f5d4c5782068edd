"""The southbound ETSI GS QKD 014 client: this node's side of its QKD devices.

The relay and the gateway read QKD keys through :class:`QkdDeviceClient`,
one per QKD link of this node, from any vendor KME that speaks ETSI 014
V1.1.1 (the emulator ``lab.qkdsim`` or real devices). :class:`QkdDevices`
builds them from the node file.

Transport: HTTPS with mutual TLS (clause 2), the node's certificate from
``[[qkd_device]]`` (or ``[tls]``) as client identity, the device verified
against the configured CA only (no environment settings can widen trust),
keep-alive connections, and a timeout on every call (``timeout_ms`` of the
device entry). The connections are the standard library's
``http.client``: on the 2-core reference machine an enc_keys round trip to
the emulator took 0.53 ms p50 with it against 1.29 ms with ``requests``
(and 0.81 ms with a bare urllib3 pool), and device calls sit on the hot
path of every key request.

Thread safety: a client is used by many threads at once. Each call borrows
a connection from a small lock-free pool (a ``SimpleQueue``) and returns it
afterwards, so no lock is held across I/O and the number of connections
never exceeds the number of concurrent callers. An idle connection the
device has closed is noticed before reuse (its socket reads as ready) and
replaced, so a request is never sent on a dead connection.

Retries, only where safe:

- ``status`` is a read; it is retried (twice) after a connection failure or
  a timeout.
- ``enc_keys`` and ``dec_keys`` consume keys on the device. They are retried
  only when the connection could not be opened at all (the request never
  left this node). Once a request may have reached the device, a failure is
  reported, never retried blindly: a repeated enc_keys would waste key
  material, and a repeated dec_keys would hit "not found" for keys the first
  attempt consumed.

Device answers map to ``ErrorCode`` in one table (``kme.qkd._errors``); the
device's own words go to ``cause`` for the private log, never to ``public``.

The sanitizing proxy of paper section IV-A.1: :func:`sanitize` splits a
northbound Key request into what the device may see (number, size, foreign
extensions) and the overlay-only fields it cannot know (additional slave
SAEs on other nodes, ``kmstn_`` extensions), which the node keeps for
routing; :meth:`QkdDeviceClient.enc_keys_request` sends the sanitized part.

The parts: ``_sanitize`` (the sanitizing proxy), ``_errors`` (device answer
to ErrorCode), ``_client`` (:class:`QkdDeviceClient`, :class:`QkdDevices`).
Import from here.
"""

from kme.qkd._client import DeviceStatus, QkdDeviceClient, QkdDevices
from kme.qkd._sanitize import OVERLAY_EXTENSION_PREFIX, OverlayFields, sanitize

__all__ = [
    "OVERLAY_EXTENSION_PREFIX",
    "DeviceStatus",
    "OverlayFields",
    "QkdDeviceClient",
    "QkdDevices",
    "sanitize",
]
