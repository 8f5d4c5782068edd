"""The process shape every kmstn gRPC service follows.

``python -m routing --config node.toml`` (and the ``kmstn-routing`` console
script) both end up in :func:`run_service`:

1. parse arguments (``--config``, ``--check-config``);
2. load and validate the node file and its topology; on a bad file print a
   message naming the file and field and exit 78 (EX_CONFIG);
3. configure JSON-lines logging;
4. build the service's dependencies explicitly (no module globals) through a
   ``build`` callback that registers servicers on a :class:`Runtime`;
5. serve gRPC with the standard health service, on a unix socket (mode 0600)
   by default or TCP with mutual TLS when configured;
6. on SIGTERM or SIGINT: report NOT_SERVING, stop accepting, let running
   calls finish (grace period), run the service's closers, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kme import log as kmelog
from kme import metrics as kmetrics
from kme.config import (
    EX_CONFIG,
    ConfigError,
    Endpoint,
    NodeConfig,
    TlsFiles,
    load_node_config,
    load_or_exit,
)
from kme.errors import ErrorCode, KmstnError
from kme.metricsserver import MetricsServer, start_metrics_server
from kme.rpcerrors import ErrorInterceptor

__all__ = ["ObservingInterceptor", "Runtime", "parse_args", "run_service", "server_credentials",
           "start_metrics"]

GRACE_SECONDS = 5.0
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    # gRPC turns SO_REUSEPORT on by default; two services on one port must
    # fail loudly instead of sharing it.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def _bind_error(address: str) -> KmstnError:
    return KmstnError(ErrorCode.UNAVAILABLE, f"cannot listen on {address} (in use?)")


def parse_args(prog: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, type=Path, help="node file (node.toml)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return parser.parse_args(argv)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: the client must present a certificate from our CA."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))],
        root_certificates=_read(tls.ca),
        require_client_auth=True,
    )


class ObservingInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Per call: the caller's request ID in the log context, and the call's metrics.

    Outermost on every server, so the status it records is the one the
    client gets (ErrorInterceptor, inside it, has already turned a
    KmstnError into its gRPC status). The request ID comes from the
    ``x-request-id`` metadata that kme.channels.call sends. Streaming calls
    (Routing.WatchTable, opened once by each follower of the table) pass untouched:
    they belong to no request, and their length says nothing.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        request_id: str | None = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == kmelog.REQUEST_ID_METADATA_KEY:
                request_id = kmelog.adopt_request_id(value)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                with kmelog.log_context(request_id=request_id):
                    response = inner(request, context)
                status = context.code()  # type: ignore[attr-defined]
                code = status.name if status is not None else "OK"
                return response
            except BaseException:
                # context.abort() raises after setting the status.
                status = context.code()  # type: ignore[attr-defined]
                code = status.name if status is not None else "UNKNOWN"
                raise
            finally:
                kmetrics.GRPC_HANDLED.labels(service, method, code).inc()
                kmetrics.GRPC_HANDLING_SECONDS.labels(service, method).observe(
                    time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def start_metrics(config: NodeConfig, service: str, log: logging.Logger,
                  tries: int = 1) -> MetricsServer | None:
    """This process's metrics listener, as the node file's [metrics] says (or none)."""
    settings = config.metrics
    if not settings.enabled:
        return None
    port = settings.ports[service]
    ports = [0] if port == 0 else list(range(port, port + tries))
    return start_metrics_server(config.metrics_host, ports, log)


class Runtime:
    """What a service's ``build`` callback gets: config, logger, servers, hooks."""

    def __init__(self, name: str, config: NodeConfig, log: logging.Logger, max_workers: int):
        self.name = name
        self.config = config
        self.log = log
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.server = self._new_server(max_workers)
        self._extra: list[tuple[grpc.Server, str]] = []
        self._closers: list[Callable[[], None]] = []
        self._starters: list[Callable[[], object]] = []
        self._service_names: list[str] = [""]

    def _new_server(self, max_workers: int) -> grpc.Server:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers,
                                       thread_name_prefix=f"{self.name}-rpc"),
            interceptors=[ObservingInterceptor(), ErrorInterceptor(self.log)],
            options=SERVER_OPTIONS,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    def serving(self, full_service_name: str) -> None:
        """Report this gRPC service name in the health service."""
        self._service_names.append(full_service_name)

    def on_start(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` once the servers are started (e.g. resume pending work)."""
        self._starters.append(fn)

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at shutdown, after the servers stopped (last added, first run)."""
        self._closers.append(fn)

    def add_tcp_server(self, host: str, port: int, tls: TlsFiles,
                       max_workers: int = 16) -> grpc.Server:
        """A second listener (e.g. the relay's neighbour-facing port), mTLS only."""
        server = self._new_server(max_workers)
        address = f"{host}:{port}"
        bound = server.add_secure_port(address, server_credentials(tls))
        if bound == 0:
            raise _bind_error(address)
        self._extra.append((server, address))
        return server

    @property
    def extra_addresses(self) -> list[str]:
        return [address for _, address in self._extra]

    # -- lifecycle, driven by run_service -------------------------------------

    def bind_internal(self, endpoint: Endpoint) -> str:
        if endpoint.scheme == "unix":
            path = Path(endpoint.address)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()  # stale socket of a previous run
            old = os.umask(0o177)
            try:
                bound = self.server.add_insecure_port(endpoint.grpc_target)
            finally:
                os.umask(old)
            if bound == 0:
                raise _bind_error(str(endpoint))
            os.chmod(path, 0o600)
            return str(endpoint)
        bound = self.server.add_secure_port(endpoint.address,
                                            server_credentials(self.config.tls))
        if bound == 0:
            raise _bind_error(str(endpoint))
        host = endpoint.address.rpartition(":")[0]
        return f"tcp://{host}:{bound}"

    def start(self) -> None:
        self.server.start()
        for server, _ in self._extra:
            server.start()
        for name in self._service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for fn in self._starters:
            try:
                fn()
            except KmstnError as exc:
                self.log.error("start-up step failed", extra={
                    "error_code": exc.code.name, "error": exc.public, "cause": exc.cause})

    def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        events = [self.server.stop(GRACE_SECONDS)]
        events += [server.stop(GRACE_SECONDS) for server, _ in self._extra]
        for ev in events:
            ev.wait(GRACE_SECONDS + 1)
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                self.log.exception("error while stopping")


def run_service(
    name: str,
    description: str,
    build: Callable[[Runtime], None],
    argv: Sequence[str] | None = None,
    max_workers: int | Callable[[NodeConfig], int] = 32,
) -> int:
    """Run one gRPC service process until SIGTERM; return its exit code."""
    args = parse_args(f"kmstn-{name}", description, argv)
    config = load_or_exit(f"kmstn-{name}", load_node_config, args.config, args.check_config)

    kmelog.configure(name, config.node_id, config.log_level)
    log = logging.getLogger(f"kmstn.{name}")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    workers = max_workers(config) if callable(max_workers) else max_workers
    runtime = Runtime(name, config, log, workers)
    try:
        build(runtime)
        address = runtime.bind_internal(config.endpoint(name))  # type: ignore[arg-type]
        metrics = start_metrics(config, name, log)
        if metrics is not None:
            runtime.on_stop(metrics.close)
        runtime.start()
    except ConfigError as exc:
        log.error("configuration error", extra={"error": exc.public})
        print(f"kmstn-{name}: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KmstnError as exc:
        log.error("cannot start", extra={"error": exc.public, "cause": exc.cause})
        print(f"kmstn-{name}: cannot start: {exc.public}", file=sys.stderr)
        runtime.stop()
        return 1
    log.info("listening", extra={"address": address,
                                 "extra_listeners": runtime.extra_addresses})
    # Wake up now and then: a signal handler runs only in the main thread,
    # between bytecodes, and a wait with a timeout guarantees it gets there.
    while not stop.wait(0.5):
        pass
    runtime.stop()
    log.info("stopped")
    return 0
