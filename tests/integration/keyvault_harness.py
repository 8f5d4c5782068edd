"""Run a real ``python -m keyvault`` process (real swtpm, real SQLCipher) for tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from keyvault.client import KeyVaultClient, StoreItem
from kme.config import NodeConfig, load_node_config
from kme.types import Key, SecretBytes
from tests.federation import FederationFiles
from tests.helpers import Pki, ServiceProcess


def new_key(size_bits: int = 256) -> Key:
    return Key(uuid.uuid4(), SecretBytes(os.urandom((size_bits + 7) // 8)), size_bits)


def item(key: Key, master: str = "sae-m", allowed: Sequence[str] = ("sae-s",),
         origin: str = "A", **extra: Any) -> StoreItem:
    return StoreItem(key, master, tuple(allowed), origin, **extra)


class VaultNode:
    """One node's keyvault: its files, its process, a client on its socket."""

    def __init__(self, root: Path, pki: Pki, keyvault: dict[str, Any] | None = None,
                 node: str = "A", data_dir: Path | None = None) -> None:
        self.root = root
        self.fed = FederationFiles(root, pki)
        self.fed.kmstn(node, "127.0.0.1")
        for sae in ("sae-m", "sae-s", "sae-t", "sae-u"):
            self.fed.sae(sae, node)
        self.fed.write()
        sections: dict[str, Any] = {"keyvault": keyvault or {"tpm": "swtpm"}}
        if data_dir is not None:
            sections["data_dir"] = str(data_dir)
        self.node_file = self.fed.node_file(node, **sections)
        self._config: NodeConfig | None = None
        self.proc: ServiceProcess | None = None
        self._runs = 0
        self._channels: list[grpc.Channel] = []

    @property
    def config(self) -> NodeConfig:
        # Loaded on first use: some tests write a node file that must not load.
        if self._config is None:
            self._config = load_node_config(self.node_file)
        return self._config

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def vault_dir(self) -> Path:
        return self.config.data_dir / "keyvault"

    @property
    def target(self) -> str:
        return self.config.keyvault_endpoint.grpc_target

    @property
    def args(self) -> list[str]:
        return ["-m", "keyvault", "--config", str(self.node_file)]

    def start(self) -> ServiceProcess:
        self._runs += 1
        self.proc = ServiceProcess(self.args, self.root, f"keyvault-{self._runs}")
        self.proc.wait_healthy(self.target, timeout=60)
        self.proc.wait_healthy(self.target, timeout=10, service="kme.rpc.v1.KeyVault")
        return self.proc

    def stop(self) -> int:
        assert self.proc is not None
        code = self.proc.stop()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.stop()

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.target)
        self._channels.append(ch)
        return ch

    def client(self, timeout: float = 10.0) -> KeyVaultClient:
        return KeyVaultClient(self.channel(), timeout=timeout)

    def all_logs(self) -> bytes:
        """Every log file any run of this node wrote (process and swtpm)."""
        out = b""
        for path in sorted(self.root.glob("keyvault-*.std*")):
            out += path.read_bytes()
        swtpm_log = self.vault_dir / "swtpm" / "swtpm.log"
        if swtpm_log.exists():
            out += swtpm_log.read_bytes()
        return out

    def data_files(self) -> Iterator[Path]:
        return (p for p in self.data_dir.rglob("*") if p.is_file())

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        if self.proc is not None:
            self.proc.stop()
