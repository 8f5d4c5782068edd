"""``kmstn sae rotate``: keep a consumer supplied with fresh kmstn keys for one peer.

Encryptors that take a pre-shared key (WireGuard and MACsec PSK rotators,
IKEv2 PPKs of RFC 8784, TLS 1.3 external PSKs) want a new key every few
minutes, the same at both ends. This is the SAE side of that::

    kmstn sae rotate --state DIR --sae sae-w --peer sae-z --role master \\
        --psk-file /run/wg/psk --interval 120 \\
      | ssh peer kmstn sae rotate --state DIR --sae sae-z --peer sae-w --role slave \\
        --psk-file /run/wg/psk

The master asks its KMSTN for one key (ETSI 014 Get key, clause 5.2), hands it
to its consumer, then prints the key ID on stdout, one line per key: stdout is
the channel to the peer. The slave reads key IDs on stdin, one a line, fetches
each from its own KMSTN (Get key with key IDs, clause 5.3) and hands it to its
consumer. ETSI 014 leaves it to the SAEs how a key ID reaches the peer; a pipe,
ssh or the consumer's own protocol all do.

Handing a key over:

- ``--psk-file PATH`` is replaced atomically (a new mode-0600 file in the same
  directory, fsync, rename over PATH), so a consumer never reads half a key.
- ``--exec CMD`` runs after each key with the key on stdin (in ``--format``),
  the key ID in ``KMSTN_KEY_ID`` and the file in ``KMSTN_PSK_FILE``. Key bytes
  never go into argv or the environment, which other users can read in /proc.

Retries: 503 (the KMSTN cannot serve now: no key stored, a path down) and
connection failures are tried again after growing, jittered delays (0.5 s,
doubling, at most ``--max-delay``) until ``--give-up-after`` seconds have
passed; 400 and 401 say the request itself is wrong and end the run at once.
Exit codes: 0 done (``--count`` keys, or end of input), 1 a key could not be
had or handed over.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.client
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lab.saeclient import SaeClient

__all__ = [
    "Backoff",
    "Consumer",
    "KeySource",
    "Retry",
    "RotateError",
    "add_rotate_parser",
    "encode",
    "rotate_master",
    "rotate_slave",
    "write_atomically",
]

Format = Literal["hex", "base64", "raw"]
FORMATS: tuple[Format, ...] = ("hex", "base64", "raw")


class RotateError(Exception):
    """A key could not be had or handed over; the message says why (never key bytes)."""


class KeySource(Protocol):
    """An ETSI 014 client for one SAE (lab.saeclient.SaeClient is one)."""

    def enc_keys(self, slave: str, number: int = 1, size: int | None = None,
                 additional: list[str] | None = None) -> tuple[int, Any]: ...

    def dec_keys(self, master: str, key_ids: list[str]) -> tuple[int, Any]: ...


@dataclass(frozen=True)
class Backoff:
    """Growing delays: ``first``, times ``factor`` each time, at most ``max_delay``.

    Each delay is spread by +-``jitter`` (a fraction), so rotators that lost
    their KMSTN together do not all come back in the same instant.
    """

    first: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.2

    def delays(self, rng: random.Random) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay * (1 + self.jitter * (2 * rng.random() - 1))
            delay = min(delay * self.factor, self.max_delay)


@dataclass
class Retry:
    """Calls one ETSI 014 request until it answers 200, a final error, or time runs out."""

    backoff: Backoff = field(default_factory=Backoff)
    give_up_after: float = 300.0
    log: Callable[[str], None] = lambda _msg: None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def run(self, call: Callable[[], tuple[int, Any]], what: str) -> Any:
        start = self.clock()
        delays = self.backoff.delays(self.rng)
        attempts = 0
        while True:
            attempts += 1
            try:
                status, body = call()
            except (OSError, http.client.HTTPException) as exc:
                reason = f"{what}: no answer ({type(exc).__name__}: {exc})"
            else:
                if status == 200:
                    return body
                reason = f"{what}: HTTP {status}: {_message(body)}"
                if status != 503:
                    # ETSI 014 clause 5: 400 and 401 describe the request; a
                    # second identical request gets the same answer.
                    raise RotateError(reason)
            delay = next(delays)
            if self.clock() - start + delay > self.give_up_after:
                raise RotateError(f"{reason} (gave up after {attempts} attempts)")
            self.log(f"{reason}; trying again in {delay:.1f} s")
            self.sleep(delay)


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return "no ETSI error message"


def _one_key(body: Any, key_id: str | None = None) -> tuple[str, bytes]:
    """The single key of a Key container (clause 4.3), checked."""
    keys = body.get("keys") if isinstance(body, dict) else None
    if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], dict):
        raise RotateError("the KMSTN answered 200 without exactly one key")
    got_id, b64 = keys[0].get("key_ID"), keys[0].get("key")
    if not isinstance(got_id, str) or not isinstance(b64, str):
        raise RotateError("the Key container lacks key_ID or key")
    if key_id is not None and got_id.lower() != key_id.lower():
        raise RotateError(f"asked for key {key_id}, got {got_id}")
    try:
        material = base64.b64decode(b64, validate=True)
    except ValueError:
        raise RotateError("the key is not base64") from None
    if not material:
        raise RotateError("the key is empty")
    return got_id, material


def encode(material: bytes, fmt: Format) -> bytes:
    """The key as the consumer reads it: hex (OpenSSL -psk, strongSwan 0x..), base64
    (WireGuard preshared-key files) with a newline, or the raw bytes."""
    if fmt == "hex":
        return material.hex().encode() + b"\n"
    if fmt == "base64":
        return base64.b64encode(material) + b"\n"
    return material


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new one.

    mkstemp creates the file with mode 0600; the rename is atomic within one
    directory, and the directory is synced so the rename survives a crash.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class Consumer:
    """Where each key goes: a PSK file, a command, or both."""

    psk_file: Path | None = None
    command: Sequence[str] = ()
    fmt: Format = "base64"
    timeout: float = 60.0

    def take(self, key_id: str, material: bytes) -> None:
        data = encode(material, self.fmt)
        if self.psk_file is not None:
            write_atomically(self.psk_file, data)
        if self.command:
            env = dict(os.environ, KMSTN_KEY_ID=key_id)
            if self.psk_file is not None:
                env["KMSTN_PSK_FILE"] = str(self.psk_file)
            try:
                # The operator's own command (--exec), run without a shell.
                done = subprocess.run(list(self.command), input=data, env=env,  # noqa: S603
                                      check=False, timeout=self.timeout, capture_output=True)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RotateError(f"{self.command[0]}: {type(exc).__name__}: {exc}") from None
            if done.returncode != 0:
                # Its output is not echoed: a consumer may print what it was given.
                raise RotateError(f"{self.command[0]} exited {done.returncode} "
                                  f"for key {key_id}")


def rotate_master(source: KeySource, peer: str, consumer: Consumer, retry: Retry, *,
                  count: int = 0, interval: float = 60.0, size: int | None = None,
                  announce: Callable[[str], None] = print,
                  sleep: Callable[[float], None] = time.sleep) -> int:
    """Fetch ``count`` keys for ``peer`` (0: for ever), ``interval`` seconds apart.

    Each key goes to the consumer first, then its ID to ``announce`` (the
    peer): the peer never switches to a key this side does not have yet.
    Returns how many keys were handed over.
    """
    done = 0
    while count == 0 or done < count:
        if done:
            sleep(interval)
        body = retry.run(lambda: source.enc_keys(peer, 1, size), f"enc_keys for {peer}")
        key_id, material = _one_key(body)
        consumer.take(key_id, material)
        announce(key_id)
        retry.log(f"key {key_id} handed over ({len(material) * 8} bits)")
        done += 1
    return done


def rotate_slave(source: KeySource, peer: str, consumer: Consumer, retry: Retry,
                 key_ids: Iterable[str], *, count: int = 0) -> int:
    """Fetch every key ID read from ``key_ids`` (one a line) from master ``peer``.

    Stops after ``count`` keys (0: at the end of the input). Returns how many
    keys were handed over.
    """
    done = 0
    for line in key_ids:
        key_id = line.strip()
        if not key_id:
            continue
        body = retry.run(functools.partial(source.dec_keys, peer, [key_id]),
                         f"dec_keys {key_id} from {peer}")
        got, material = _one_key(body, key_id)
        consumer.take(got, material)
        retry.log(f"key {got} handed over ({len(material) * 8} bits)")
        done += 1
        if count and done >= count:
            break
    return done


# -- command line ----------------------------------------------------------------------


def add_rotate_parser(sae_sub: Any) -> None:
    """Register ``kmstn sae rotate`` on the ``kmstn sae`` subparsers."""
    p = sae_sub.add_parser("rotate", help="keep a consumer supplied with fresh keys for a peer")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--state", help="a federation state directory (federation.json)")
    where.add_argument("--kme", metavar="URL", help="the KMSTN's ETSI 014 URL (with --cert, "
                       "--key, --ca)")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    p.add_argument("--sae", required=True, help="this SAE (the CN of its certificate)")
    p.add_argument("--peer", required=True, help="the other SAE")
    p.add_argument("--role", choices=("master", "slave"), required=True,
                   help="master: fetch new keys and print their IDs; slave: read key IDs "
                   "on stdin and fetch them")
    p.add_argument("--psk-file", type=Path, help="replace this file with each key")
    p.add_argument("--exec", dest="command", help="run this after each key (key on stdin)")
    p.add_argument("--format", choices=FORMATS, default="base64")
    p.add_argument("--count", type=int, default=0, help="stop after N keys (0: never)")
    p.add_argument("--interval", type=float, default=60.0, help="master: seconds between keys")
    p.add_argument("--size", type=int, help="master: key size in bits (the KMSTN's default)")
    p.add_argument("--max-delay", type=float, default=30.0, help="longest wait between retries")
    p.add_argument("--give-up-after", type=float, default=300.0,
                   help="seconds of failed attempts before giving up on one key")
    p.set_defaults(func=run)


def _source(args: argparse.Namespace) -> Any:
    if args.state:
        return SaeClient.from_manifest(Path(args.state) / "federation.json", args.sae)
    if not (args.cert and args.key and args.ca):
        raise RotateError("--kme needs --cert, --key and --ca")
    return SaeClient(args.sae, args.kme, args.cert, args.key, args.ca)


def run(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(f"kmstn sae rotate: {msg}", file=sys.stderr, flush=True)

    def announce(key_id: str) -> None:
        print(key_id, flush=True)

    if args.psk_file is None and not args.command:
        log("nothing to hand keys to: give --psk-file, --exec or both")
        return 1
    consumer = Consumer(args.psk_file, shlex.split(args.command or ""), args.format)
    retry = Retry(Backoff(max_delay=args.max_delay), args.give_up_after, log)
    try:
        source = _source(args)
        try:
            if args.role == "master":
                rotate_master(source, args.peer, consumer, retry, count=args.count,
                              interval=args.interval, size=args.size, announce=announce)
            else:
                rotate_slave(source, args.peer, consumer, retry, sys.stdin, count=args.count)
        finally:
            source.close()
    except RotateError as exc:
        log(str(exc))
        return 1
    except BrokenPipeError:
        # The reader of our key IDs (the peer's side) went away.
        log("stdout closed: the peer no longer reads key IDs")
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # so that flushing at exit fails no more
        return 1
    return 0
