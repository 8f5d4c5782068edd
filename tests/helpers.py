"""Helpers for tests that run real kmstn processes on 127.0.0.x.

Nothing here fakes a component: processes are started with the same
``python -m <service> --config node.toml`` command an operator uses, talk
over real unix sockets and TLS, and are stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lab.pki import CertificateAuthority

REPO = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and never handed out before in this test process.

    The kernel may offer the same ephemeral port twice in a row once the probe
    socket is closed; remembering what was handed out keeps one topology from
    getting two listeners on one port.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a small TOML document: scalars, tables and arrays of tables."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items()
                   if not isinstance(v, dict) and not _is_table_array(v)}
        for k, v in scalars.items():
            lines.append(f"{k} = {toml_value(v)}")
        for k, v in table.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                lines.append(f"\n[{name}]")
                emit(name, v)
            elif _is_table_array(v):
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    emit(name, item)

    emit("", data)
    path.write_text("\n".join(lines) + "\n")
    return path


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)


class Pki:
    """A throwaway CA for one test session, issuing certificates on demand."""

    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority.create(directory / "ca", days=2)
        self.directory = directory
        self._issued: dict[tuple[str, tuple[str, ...]], tuple[Path, Path]] = {}

    @property
    def ca_path(self) -> Path:
        return self.ca.cert_path

    def issue(self, name: str, ips: Sequence[str] = ("127.0.0.1",)) -> tuple[Path, Path]:
        """A certificate for ``name`` valid for ``ips`` (cached per name and addresses)."""
        key = (name, tuple(ips))
        if key not in self._issued:
            out = self.directory / "certs" / f"{len(self._issued)}"
            issued = self.ca.issue(name, out, ips=tuple(ips), dns=("localhost",), days=2)
            self._issued[key] = (issued.cert, issued.key)
        return self._issued[key]


class ServiceProcess:
    """One real service process; logs go to files next to its config."""

    def __init__(self, args: Sequence[str], log_dir: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._out = self.stdout_path.open("wb")
        self._err = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdout=self._out, stderr=self._err, env=full_env,
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        self._out.flush()
        self._err.flush()
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace")

    def wait_healthy(self, target: str, timeout: float = 30.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with grpc.insecure_channel(target) as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not healthy after {timeout}s ({last}):\n{self.logs()}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running(args: Sequence[str], log_dir: Path, name: str,
            env: dict[str, str] | None = None) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(args, log_dir, name, env)
    try:
        yield proc
    finally:
        proc.stop()


def run_cli(args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
