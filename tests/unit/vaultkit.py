"""Helpers for unit tests of the Vault on real SQLCipher files, with a controllable clock."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from keyvault.records import RecordCipher, derive_db_key
from keyvault.store import Vault
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, KeyGrant, OutboxJob, SecretBytes

ROOT = SecretBytes(os.urandom(32))
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def at(seconds: float) -> dt.datetime:
    """An aware UTC datetime ``seconds`` after T0."""
    return dt.datetime.fromtimestamp(T0 + seconds, dt.UTC)


def open_vault(path: Path, clock: Clock, root: SecretBytes = ROOT,
               tombstone_ttl_s: float = 3600) -> Vault:
    return Vault.open(path, derive_db_key(root), RecordCipher.from_root(root),
                      tombstone_ttl_s=tombstone_ttl_s, clock=clock)


def key(bits: int = 256) -> Key:
    return Key(uuid.uuid4(), SecretBytes(os.urandom((bits + 7) // 8)), bits)


def rec(k: Key, master: str = "m", allowed: Sequence[str] = ("s",), origin: str = "A",
        ttl: float = 600, created: float = T0, upstream: str | None = None) -> KeyGrant:
    c = dt.datetime.fromtimestamp(created, dt.UTC)
    return KeyGrant(k, master, tuple(allowed), origin, upstream, created_at=c,
                    expires_at=dt.datetime.fromtimestamp(T0 + ttl, dt.UTC))


def code_of(fn: object, *args: object, **kwargs: object) -> ErrorCode:
    with pytest.raises(KmstnError) as err:
        fn(*args, **kwargs)  # type: ignore[operator]
    return err.value.code


def job(kind: str = "deliver", destination: str = "C", payload: bytes | None = None,
        ttl: float = 3600, due: float | None = None, job_id: uuid.UUID | None = None
        ) -> OutboxJob:
    """A job expiring ``ttl`` s after T0, due ``due`` s after T0 (None: at once)."""
    return OutboxJob(job_id or uuid.uuid4(), kind, destination,
                     SecretBytes(os.urandom(48) if payload is None else payload),
                     expires_at=at(ttl), next_due_at=None if due is None else at(due))
