"""The ETSI 014 listener: the Flask app under Gunicorn with mutual TLS 1.2+.

gthread workers keep connections alive (the sync worker closes every
connection, which would cost a TLS handshake per request). Gunicorn calls
its ``ssl_context`` hook for every accepted connection; the hook here builds
the context once per worker and hands back the same one. The app and its
gRPC channels are built in each worker after the fork (gRPC channels do not
survive a fork).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from kme.config import NodeConfig

__all__ = ["Etsi014Server", "tls_context"]


def tls_context(config: NodeConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # ETSI 014 clause 2: TLS 1.2 or higher
    ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    ctx.load_verify_locations(str(config.tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Etsi014Server(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: NodeConfig, load_app: Callable[[], Any],
                 on_exit: Callable[[], None] = lambda: None) -> None:
        self._node_config = config
        self._load_app = load_app
        self._on_exit = on_exit
        super().__init__()

    def load_config(self) -> None:
        c = self._node_config
        cached: list[ssl.SSLContext] = []

        def ssl_context_hook(_conf: Any, _default: Callable[[], ssl.SSLContext]
                             ) -> ssl.SSLContext:
            if not cached:
                cached.append(tls_context(c))
            return cached[0]

        settings: dict[str, Any] = {
            "bind": [f"{c.node.host}:{c.node.etsi014_port}"],
            "workers": c.gateway.workers,
            "worker_class": "gthread",
            "threads": c.gateway.threads,
            "worker_connections": 1000,
            "keepalive": 30,
            "timeout": 60,
            "graceful_timeout": 10,
            "certfile": str(c.tls.cert),
            "keyfile": str(c.tls.key),
            "ca_certs": str(c.tls.ca),
            "cert_reqs": ssl.CERT_REQUIRED,
            "ssl_context": ssl_context_hook,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "proc_name": f"kmstn-gateway014-{c.node_id}",
            "reuse_port": False,
            "preload_app": False,
            # The arbiter leaves through sys.exit; this runs just before.
            "on_exit": lambda _arbiter: self._on_exit(),
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._load_app()
