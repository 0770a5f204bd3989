"""The token signing keys on disk (PROTOCOL.md §3): persisted, shared, rotated, pruned.

How this works: a directory holds one PKCS#8 PEM per key (mode 0600, never overwritten) and a
JSON index (`keys.json`) naming each key's algorithm, when it was made and when it was
retired; the key id is the RFC 7638 thumbprint of the public key, so it is stable and safe as
a file name. Every read of the directory holds a shared flock on its `.lock` file and every
change an exclusive one, so the server and an operator's `chat-server keys rotate` in
another process may share it; the index is replaced atomically and forgets a key before its
file goes. What this process knows is one frozen `_KeySet`, replaced whole after each read or
change: the token authority reads it on the event loop (`signing_key`, `public_key`, `jwks`)
with no lock and always sees one consistent set, while `open`, `reload`, `refresh`, `rotate`
and `prune` are BLOCKING (flock, file I/O, key generation) and run in a worker thread in
the server. Pure module: no trio.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from chat.protocol.tokens import (
    PRIVATE_KEY_TYPES,
    PrivateKey,
    PublicKey,
    TokenConfigError,
    algorithm_of,
    is_plain_kid,
    jwk_thumbprint,
    public_jwk,
)
from chat.store.errors import must_exist, opening
from chat.store.files import write_atomic

RSA_KEY_BITS = 3072  # NIST SP 800-57: 128-bit security, matching P-256 and Ed25519
INDEX_NAME = "keys.json"
LOCK_NAME = ".lock"
KEY_FILE_MODE = 0o600  # private keys: owner only
KEY_DIR_MODE = 0o700
_KEY_GENERATORS: dict[str, Callable[[], PrivateKey]] = {
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": Ed25519PrivateKey.generate,
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS),
}


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """One line of the key index."""

    kid: str
    algorithm: str
    created: float
    retired_at: float | None = None

    @classmethod
    def from_json(cls, entry: object) -> _KeyRecord:
        if not isinstance(entry, dict) or not is_plain_kid(entry.get("kid")):
            raise TokenConfigError("key index entry without a plain kid")
        if entry.get("algorithm") not in _KEY_GENERATORS:
            raise TokenConfigError(f"key {entry['kid']}: unsupported algorithm")
        retired = entry.get("retired_at")
        return cls(
            entry["kid"],
            entry["algorithm"],
            float(entry["created"]),
            None if retired is None else float(retired),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "algorithm": self.algorithm,
            "created": self.created,
            "retired_at": self.retired_at,
        }


@dataclass(frozen=True, slots=True)
class _KeySet:
    """Every key this process knows, as one value: swapped whole, never changed in place."""

    records: tuple[_KeyRecord, ...]
    private: Mapping[str, PrivateKey]
    public: Mapping[str, PublicKey]
    active_kid: str | None  # the newest key not retired

    @classmethod
    def of(cls, records: tuple[_KeyRecord, ...], private: Mapping[str, PrivateKey]) -> _KeySet:
        active = [record for record in records if record.retired_at is None]
        newest = max(active, key=lambda record: record.created).kid if active else None
        public = {kid: key.public_key() for kid, key in private.items()}
        return cls(records, MappingProxyType(dict(private)), MappingProxyType(public), newest)

    def retiring_active(self, now: float) -> tuple[_KeyRecord, ...]:
        """The records with the active key retired at `now`."""
        return tuple(
            record if record.retired_at is not None else replace(record, retired_at=now)
            for record in self.records
        )


_EMPTY = _KeySet.of((), {})


class KeyStore:
    """Signing keys persisted in a directory, safe to share between processes and threads.

    Reopening the same directory yields the same keys, so tokens survive restarts.
    """

    def __init__(self, directory: Path, algorithm: str) -> None:
        if algorithm not in _KEY_GENERATORS:
            raise TokenConfigError(f"signing algorithm must be one of {sorted(_KEY_GENERATORS)}")
        self._dir = directory
        self._algorithm = algorithm
        self._keys = _EMPTY
        self._mutex = threading.Lock()  # this process's readers and writers of the directory
        self._seen_mtime: int | None = None  # the directory's mtime when `refresh` last read it

    @classmethod
    def open(cls, directory: Path, algorithm: str = "ES256", *, create: bool = True) -> KeyStore:
        """Open (or create) the key directory; creates the first key if there is none.

        Raises `StoreUnusable` when the directory cannot be made or locked, `StoreMissing`
        when `create` is False and it holds no key index."""
        store = cls(directory, algorithm)
        with opening("the signing-key store", directory):
            if not create:
                must_exist(directory / INDEX_NAME)
            directory.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
            with store._mutex, store._locked(exclusive=True):
                keys = store._read()
                if keys.active_kid is None:
                    keys = store._with_new_key(
                        keys, keys.records, _KEY_GENERATORS[algorithm](), time.time()
                    )
                store._keys = keys
        return store

    # ------------------------------------------------------------------ in memory, any thread

    @property
    def active_kid(self) -> str:
        kid = self._keys.active_kid
        if kid is None:
            raise TokenConfigError(f"{self._dir / INDEX_NAME}: no active signing key")
        return kid

    def signing_key(self) -> tuple[str, PrivateKey]:
        """(kid, key) of the active key."""
        keys = self._keys  # one snapshot: the kid and its key always match
        if keys.active_kid is None:
            raise TokenConfigError(f"{self._dir / INDEX_NAME}: no active signing key")
        return keys.active_kid, keys.private[keys.active_kid]

    def public_key(self, kid: str) -> PublicKey | None:
        """The public key named `kid`, or None when this store has no such key."""
        return self._keys.public.get(kid)

    def jwks(self) -> dict[str, Any]:
        """{"keys": [...]}: exactly the keys that still verify, each with kid, alg, use=sig."""
        keys = self._keys
        return {
            "keys": [
                {
                    **public_jwk(keys.public[record.kid]),
                    "kid": record.kid,
                    "alg": record.algorithm,
                    "use": "sig",
                }
                for record in keys.records
            ]
        }

    # ------------------------------------------------------------------ BLOCKING

    def rotate(self, now: float) -> str:
        """Make a new active key; the previous one is retired at `now` but still verifies."""
        key = _KEY_GENERATORS[self._algorithm]()  # before the lock: RSA takes a while
        with self._mutex, self._locked(exclusive=True):
            keys = self._read()
            self._keys = self._with_new_key(keys, keys.retiring_active(now), key, now)
        return jwk_thumbprint(key.public_key())

    def prune(self, now: float, max_token_lifetime: float) -> list[str]:
        """Drop keys retired more than `max_token_lifetime` ago (pass lifetime + leeway)."""
        with self._mutex, self._locked(exclusive=True):
            keys = self._read()
            expired = [
                record.kid
                for record in keys.records
                if record.retired_at is not None and record.retired_at + max_token_lifetime <= now
            ]
            if expired:
                kept = tuple(record for record in keys.records if record.kid not in expired)
                self._write_index(kept)  # the index forgets a key before its file goes
                for kid in expired:
                    (self._dir / f"{kid}.pem").unlink(missing_ok=True)
                keys = _KeySet.of(kept, {r.kid: keys.private[r.kid] for r in kept})
            self._keys = keys
        return expired

    def reload(self) -> None:
        """Re-read the directory: another process may have rotated or pruned."""
        with self._mutex, self._locked(exclusive=False):
            self._keys = self._read()

    def refresh(self) -> bool:
        """Re-read the directory if it changed since the last `refresh`; True if it did."""
        mtime = self._dir.stat().st_mtime_ns  # taken first: a change during the read is seen next
        if mtime == self._seen_mtime:
            return False
        self.reload()
        self._seen_mtime = mtime
        return True

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, KEY_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> _KeySet:
        """The keys the index names, reusing those already loaded."""
        path = self._dir / INDEX_NAME
        try:
            document = json.loads(path.read_bytes())
            records = tuple(_KeyRecord.from_json(entry) for entry in document["keys"])
        except FileNotFoundError:
            records = ()
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenConfigError(f"{path}: malformed key index ({exc})") from exc
        known = self._keys.private
        private = {
            record.kid: known.get(record.kid) or self._load_key(record) for record in records
        }
        return _KeySet.of(records, private)

    def _load_key(self, record: _KeyRecord) -> PrivateKey:
        path = self._dir / f"{record.kid}.pem"
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise TokenConfigError(f"{path}: cannot load signing key ({exc})") from exc
        if not isinstance(key, PRIVATE_KEY_TYPES):
            raise TokenConfigError(f"{path}: unsupported key type {type(key).__name__}")
        public = key.public_key()
        if algorithm_of(public) != record.algorithm or jwk_thumbprint(public) != record.kid:
            raise TokenConfigError(f"{path}: key does not match its kid and algorithm")
        return key

    def _with_new_key(
        self, keys: _KeySet, records: tuple[_KeyRecord, ...], key: PrivateKey, now: float
    ) -> _KeySet:
        """Write `key` (its file first, then the index naming it) and return the new set."""
        kid = jwk_thumbprint(key.public_key())
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        write_atomic(self._dir / f"{kid}.pem", pem, mode=KEY_FILE_MODE, exclusive=True)
        records = (*records, _KeyRecord(kid, self._algorithm, now))
        self._write_index(records)
        return _KeySet.of(records, {**keys.private, kid: key})

    def _write_index(self, records: tuple[_KeyRecord, ...]) -> None:
        """Replace the index atomically: readers see the old or the new one, never half."""
        document = {"keys": [record.to_json() for record in records]}
        write_atomic(
            self._dir / INDEX_NAME, json.dumps(document, indent=2).encode(), mode=KEY_FILE_MODE
        )
