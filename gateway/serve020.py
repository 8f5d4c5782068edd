"""The ETSI 020 listener: the Flask app under cheroot, TLS 1.3 with X25519MLKEM768.

cheroot's pyOpenSSL adapter completes the handshake lazily, on the first
read in a worker thread, so the peer certificate is not known when the
connection is accepted. :class:`_PeerGateway` adds it to the WSGI environ
when the request is built (after the handshake), together with the
negotiated TLS group, which the 020 views check (gateway/etsi020/views.py).
Handshakes therefore never block the acceptor thread.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from cheroot import wsgi
from cheroot.ssl.pyopenssl import pyOpenSSLAdapter
from OpenSSL import SSL

from gateway.auth import PEER_CN_KEY, TLS_GROUP_KEY, TLS_VERSION_KEY
from kme.config import NodeConfig
from kme.pqtls import peer_identity, server_context

__all__ = ["Etsi020Server"]

log = logging.getLogger("kmstn.gateway.etsi020")


class _PeerGateway(wsgi.Gateway_10):  # type: ignore[misc]
    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        conn = self.req.conn.socket
        if isinstance(conn, SSL.Connection):
            env[PEER_CN_KEY] = peer_identity(conn)
            env[TLS_GROUP_KEY] = conn.get_group_name()
            env[TLS_VERSION_KEY] = conn.get_protocol_version_name()
        return env


class _Server(wsgi.Server):  # type: ignore[misc]
    def error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        # Handshake failures of unauthenticated clients land here; they are
        # routine, so keep them at debug unless cheroot calls them errors.
        log.log(logging.DEBUG if level < logging.ERROR else logging.WARNING, "cheroot: %s",
                msg, exc_info=traceback)


class Etsi020Server:
    def __init__(self, config: NodeConfig, app: Any) -> None:
        node = config.node
        threads = config.gateway.threads
        self._server = _Server((node.host, node.etsi020_port), app, numthreads=threads,
                               max=threads, request_queue_size=128, timeout=30,
                               shutdown_timeout=10, server_name=f"kmstn-{node.id}")
        self._server.gateway = _PeerGateway
        adapter = pyOpenSSLAdapter(str(config.tls.cert), str(config.tls.key))
        adapter.context = server_context(config.tls)
        self._server.ssl_adapter = adapter
        self.address = f"{node.host}:{node.etsi020_port}"

    def serve_until_signal(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            threading.Thread(target=self._server.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self._server.prepare()
        log.info("listening", extra={"address": self.address})
        self._server.serve()

    def stop(self) -> None:
        self._server.stop()
