"""``python -m keyvault --config node.toml``: the key vault process.

Start: unseal the root secret once (TPM, swtpm, or a key from a file or
stdin; see keyvault.sealing), open the SQLCipher database, start the expiry
thread, serve kme.rpc.v1.KeyVault. A vault that cannot be unsealed or opened
stops the process with exit code 1 and a message saying why, never a
traceback. On SIGTERM the expiry thread stops and the database is closed
after the last call finished.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import sqlcipher3

from keyvault.records import RecordCipher, derive_db_key
from keyvault.sealing import DB_FILE, obtain_root_secret
from keyvault.service import KeyVaultService
from keyvault.store import Sweeper, Vault
from kme import metrics
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import keyvault_pb2, keyvault_pb2_grpc
from kme.server import Runtime, run_service

# Calls that wait for keys in flight hold a worker thread each.
MAX_WORKERS = 64


def _lock_directory(vault_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on the vault directory for the life of the process.

    A second vault on the same files would pass SQLite's own locking, but
    its waiting takers would never hear of the first one's stores, and it
    would replace the first one's socket: refuse to start instead.
    """
    handle = (vault_dir / "keyvault.lock").open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise KmstnError(ErrorCode.UNAVAILABLE,
                         f"another keyvault process is using {vault_dir}") from None
    return handle


def build(rt: Runtime) -> None:
    settings = rt.config.keyvault
    vault_dir = rt.config.data_dir / "keyvault"
    # Everything the vault writes (database, WAL, sealed key, swtpm state)
    # is for this user only.
    os.umask(0o077)
    try:
        vault_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = _lock_directory(vault_dir)
        rt.on_stop(lock.close)
        root = obtain_root_secret(settings, vault_dir, rt.log)
        started = time.perf_counter()
        vault = Vault.open(vault_dir / DB_FILE, derive_db_key(root.secret),
                           RecordCipher.from_root(root.secret),
                           tombstone_ttl_s=settings.tombstone_ttl_s)
    except OSError as exc:
        raise KmstnError(ErrorCode.UNAVAILABLE,
                         f"cannot use the vault directory {vault_dir}: {exc.strerror}",
                         cause=str(exc)) from None
    except sqlcipher3.Error as exc:
        raise KmstnError(ErrorCode.INTERNAL, f"cannot open the vault database in {vault_dir}",
                         cause=f"{type(exc).__name__}: {exc}") from None
    opened = time.perf_counter() - started
    rt.on_stop(vault.close)
    sweeper = Sweeper(vault, rt.log)
    sweeper.start()
    rt.on_stop(sweeper.stop)
    _, total = vault.status()
    rt.log.info("vault opened", extra={
        "protection": root.protection, "new_vault": root.created,
        "unseal_ms": round(root.seconds * 1000, 2), "open_ms": round(opened * 1000, 2),
        "keys": total, "database": str(vault_dir / DB_FILE)})
    # Rows and stock per SAE pair are read from the vault when scraped.
    stock = metrics.register_keyvault_stock(vault.status, rt.log)
    rt.on_stop(lambda: metrics.unregister(stock))
    keyvault_pb2_grpc.add_KeyVaultServicer_to_server(
        KeyVaultService(vault, rt.log, settings.key_ttl_s), rt.server)
    rt.serving(keyvault_pb2.DESCRIPTOR.services_by_name["KeyVault"].full_name)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("keyvault", "kmstn key vault (TPM-sealed SQLCipher key store)", build,
                       argv, max_workers=MAX_WORKERS)


if __name__ == "__main__":
    sys.exit(main())
