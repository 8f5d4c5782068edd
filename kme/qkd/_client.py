"""The southbound ETSI 014 client: connections, calls and retries toward one device."""

from __future__ import annotations

import http.client
import json
import queue
import select
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import quote

from kme import etsi014
from kme import metrics as kmetrics
from kme.config import DeviceEndpoint, NodeConfig, QkdDeviceAccess, QkdLink
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import KeyRequest, Status
from kme.qkd._errors import Op, device_error
from kme.qkd._sanitize import OverlayFields, sanitize
from kme.types import Key, NodeId

__all__ = ["DeviceStatus", "QkdDeviceClient", "QkdDevices"]

_STATUS_ATTEMPTS: Final = 3
_CONNECT_ATTEMPTS: Final = 3
# Idle connections older than this are not reused (the emulator closes after 60 s).
_IDLE_S: Final = 30.0

DeviceStatus = Status
T = TypeVar("T")


class _TransportError(KmstnError):
    """No answer from the device (connection failure or timeout).

    ``sent`` is False when the request never left this node (the connection
    could not be opened): then even a call that consumes keys may be tried again.
    """

    def __init__(self, code: ErrorCode, public: str, *, cause: str, sent: bool = True) -> None:
        super().__init__(code, public, cause=cause)
        self.sent = sent


def _usable(conn: http.client.HTTPSConnection) -> bool:
    """An idle keep-alive connection is usable unless its socket reads as ready:
    ready means the device closed it (or sent something unasked)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class QkdDeviceClient:
    """ETSI 014 toward this node's device on one QKD link.

    The path SAE is always the device SAE of the other end of the link: the
    slave for status and enc_keys, the master for dec_keys (clause 5).
    """

    def __init__(self, link: QkdLink, node: NodeId, access: QkdDeviceAccess) -> None:
        self.link = link
        self.node = node
        self.device: DeviceEndpoint = link.device_of(node)
        self.peer: DeviceEndpoint = link.peer_device_of(node)
        self.access = access
        self._timeout = access.timeout_ms / 1000
        peer_path = quote(self.peer.sae_id, safe="")
        self._base = f"/api/v1/keys/{peer_path}"
        self._tls = ssl.create_default_context(cafile=str(access.tls.ca))
        # The device is identified by its certificate chain (our CA) and its
        # address; device certificates name their KME ID, not a host name.
        self._tls.check_hostname = False
        self._tls.load_cert_chain(str(access.tls.cert), str(access.tls.key))
        self._idle: queue.SimpleQueue[tuple[http.client.HTTPSConnection, float]] = (
            queue.SimpleQueue())
        self._closed = threading.Event()
        self._open: set[http.client.HTTPSConnection] = set()
        self._open_guard = threading.Lock()  # only around set updates, never I/O

    def __repr__(self) -> str:
        return f"QkdDeviceClient(link={self.link.id!r}, node={self.node!r})"

    @property
    def link_id(self) -> str:
        return self.link.id

    # -- connections ---------------------------------------------------------------------

    def _borrow(self) -> tuple[http.client.HTTPSConnection, bool]:
        """A connection and whether it is fresh (not yet connected)."""
        if self._closed.is_set():
            raise KmstnError(ErrorCode.UNAVAILABLE, "the QKD device client is closed")
        now = time.monotonic()
        while True:
            try:
                conn, since = self._idle.get_nowait()
            except queue.Empty:
                break
            if now - since < _IDLE_S and _usable(conn):
                return conn, False
            self._discard(conn)
        conn = http.client.HTTPSConnection(self.device.host, self.device.port,
                                           timeout=self._timeout, context=self._tls)
        with self._open_guard:
            self._open.add(conn)
        return conn, True

    def _give_back(self, conn: http.client.HTTPSConnection) -> None:
        if self._closed.is_set():
            self._discard(conn)
        else:
            self._idle.put((conn, time.monotonic()))

    def _discard(self, conn: http.client.HTTPSConnection) -> None:
        conn.close()
        with self._open_guard:
            self._open.discard(conn)

    def close(self) -> None:
        """Close every connection (idle or still borrowed); later calls fail UNAVAILABLE."""
        self._closed.set()
        with self._open_guard:
            conns, self._open = list(self._open), set()
        for conn in conns:
            conn.close()

    # -- one call ----------------------------------------------------------------------

    def _send(self, op: Op, method: str, path: str, body: dict[str, Any] | None
              ) -> tuple[int, bytes]:
        """One HTTP exchange; transport failures become TIMEOUT or UNAVAILABLE.

        A _TransportError with ``sent=False`` means the request never left
        this node (the connection could not be opened), so any call may be
        tried again.
        """
        conn, fresh = self._borrow()
        where = f"{self.link.id} {op}"
        try:
            if fresh:
                try:
                    conn.connect()
                except (OSError, ssl.SSLError) as exc:
                    self._discard(conn)
                    code = ErrorCode.TIMEOUT if isinstance(exc, TimeoutError) else \
                        ErrorCode.UNAVAILABLE
                    raise _TransportError(code, "the QKD device is unreachable",
                                          cause=f"{where}: {exc!r}", sent=False) from None
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Accept": etsi014.MEDIA_TYPE}
            if data is not None:
                headers["Content-Type"] = etsi014.MEDIA_TYPE
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            content = response.read()
        except TimeoutError as exc:
            self._discard(conn)
            raise _TransportError(ErrorCode.TIMEOUT, "the QKD device did not answer in time",
                                  cause=f"{where}: {exc!r}") from None
        except (OSError, http.client.HTTPException) as exc:
            self._discard(conn)
            raise _TransportError(ErrorCode.UNAVAILABLE, "the QKD device is unreachable",
                                  cause=f"{where}: {exc!r}") from None
        if response.will_close:
            self._discard(conn)
        else:
            self._give_back(conn)
        return response.status, content

    def _call(self, op: Op, method: str, path: str, body: dict[str, Any] | None,
              parse: Callable[[bytes], T], attempts: int = 1) -> T:
        """Send one call; ``attempts`` > 1 only for reads. A request that never left
        this node is tried again up to _CONNECT_ATTEMPTS times whatever the call."""
        started = time.perf_counter()
        try:
            result = self._call_once(op, method, path, body, parse, attempts)
        except KmstnError as exc:
            kmetrics.observe_device_call(self.link.id, op, exc.code.name,
                                         time.perf_counter() - started)
            raise
        bits = sum(k.size_bits for k in result) if isinstance(result, list) else 0
        kmetrics.observe_device_call(self.link.id, op, "ok", time.perf_counter() - started,
                                     bits)
        return result

    def _call_once(self, op: Op, method: str, path: str, body: dict[str, Any] | None,
                   parse: Callable[[bytes], T], attempts: int) -> T:
        tries = 0
        while True:
            tries += 1
            try:
                status, content = self._send(op, method, path, body)
                break
            except _TransportError as exc:
                if tries >= (attempts if exc.sent else max(attempts, _CONNECT_ATTEMPTS)):
                    raise
        if status != 200:
            raise device_error(self.link.id, op, status, content)
        try:
            return parse(content)
        except KmstnError as exc:
            raise KmstnError(ErrorCode.UNAVAILABLE, "the QKD device answered badly",
                             cause=f"{self.link.id} {op}: {exc.public}") from None

    # -- ETSI 014 ----------------------------------------------------------------------

    def status(self) -> DeviceStatus:
        """Get status (clause 5.1); a read, so retried after a transport failure."""
        return self._call("status", "GET", f"{self._base}/status", None,
                          etsi014.parse_status_body, attempts=_STATUS_ATTEMPTS)

    def enc_keys(self, number: int = 1, size: int | None = None) -> list[Key]:
        """Get key (clause 5.2): ``number`` new keys of ``size`` bits (device default if None)."""
        body: dict[str, Any] = {"number": number}
        if size is not None:
            body["size"] = size
        return self._call("enc_keys", "POST", f"{self._base}/enc_keys", body,
                          lambda b: etsi014.parse_key_container_body(b, number=number,
                                                                      size=size))

    def enc_keys_request(self, req: KeyRequest) -> tuple[list[Key], OverlayFields]:
        """Get key for a northbound Key request: sanitized for the device (paper IV-A.1).

        Returns the keys and the overlay fields kept back for routing.
        """
        device_req, overlay = sanitize(req)
        keys = self._call("enc_keys", "POST", f"{self._base}/enc_keys",
                          etsi014.key_request_body(device_req),
                          lambda b: etsi014.parse_key_container_body(
                              b, number=device_req.number, size=device_req.size))
        return keys, overlay

    def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]:
        """Get key with key IDs (clause 5.3): every key asked for, in order, or an error."""
        if not key_ids:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "no key IDs to fetch")
        wanted = list(key_ids)
        keys = self._call("dec_keys", "POST", f"{self._base}/dec_keys",
                          etsi014.key_ids_body(wanted), etsi014.parse_key_container_body)
        by_id = {k.key_id: k for k in keys}
        if len(keys) != len(wanted) or set(by_id) != set(wanted):
            raise KmstnError(ErrorCode.UNAVAILABLE, "the QKD device answered badly",
                             cause=f"{self.link.id} dec_keys: asked for {len(wanted)} keys, "
                                   f"got {len(keys)} with different IDs")
        return [by_id[k] for k in wanted]


class QkdDevices:
    """This node's QKD device clients, one per QKD link it ends."""

    def __init__(self, config: NodeConfig) -> None:
        self.node = config.node_id
        self._by_link: dict[str, QkdDeviceClient] = {}
        self._by_peer: dict[NodeId, QkdDeviceClient] = {}
        for link_id, access in config.qkd_devices.items():
            link = config.topology.link(link_id)
            if not isinstance(link, QkdLink):
                raise KmstnError(ErrorCode.UNKNOWN_NODE, f"{link_id!r} is not a QKD link")
            client = QkdDeviceClient(link, self.node, access)
            self._by_link[link_id] = client
            self._by_peer[link.other(self.node)] = client

    def for_link(self, link_id: str) -> QkdDeviceClient:
        try:
            return self._by_link[link_id]
        except KeyError:
            raise KmstnError(ErrorCode.UNKNOWN_NODE,
                             f"{self.node} has no QKD device on link {link_id!r}") from None

    def toward(self, peer: NodeId) -> QkdDeviceClient | None:
        """The device of the QKD link shared with neighbour ``peer``, if any."""
        return self._by_peer.get(peer)

    @property
    def links(self) -> tuple[str, ...]:
        return tuple(self._by_link)

    def close(self) -> None:
        for client in self._by_link.values():
            client.close()
