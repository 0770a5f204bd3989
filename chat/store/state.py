"""The server's durable security state (PROTOCOL.md §7): refresh tokens and revocations.

How this works: one SQLite file in WAL mode, shared by the running server and operator commands
(`chat-server revoke`) in other processes. Refresh tokens are opaque random strings stored only
as SHA-256 hashes; each is bound to (sub, x5t), single-use, and belongs to a family started by
`POST /auth/token`. Presenting a spent token is theft (RFC 9700 §4.14.2): the whole family is
revoked. Rows are bounded per identity: a new family beyond the caller's `max_families`
replaces the oldest live ones (their tokens then answer `refresh_expired`), only the newest
dead families (replaced, revoked, reused) are remembered, and a family keeps only its newest
spent tokens for reuse detection. "Newest" is SQLite's rowid order: a new row's rowid is one
more than the largest in its table, so it grows with every insert, whatever the wall clock
does. Revoking an identity records when; lifting the block (`unrevoke`) keeps that time, and
the identity's access tokens issued before it stay revoked. Revocations bump a counter:
`load_revocations()` reads that one integer and reads the revoked identities and token ids
again only when it moved; what it read is `revocations`, a frozen snapshot the server checks
every upgrade and every live session against without touching the database (a change made
through this store shows there at once, one made by another process, such as `chat-server
revoke`, at the server's next poll). Writes run in `BEGIN IMMEDIATE` transactions, so two
processes serialize instead of failing half-way.
Every method but `revocations` is BLOCKING (SQLite). Pure module: no trio.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from chat.protocol.errors import HttpRefusal
from chat.protocol.tokens import (
    Claims,
    IdentityRevoked,
    InvalidRefresh,
    RefreshExpired,
    RefreshReused,
    TokenCertMismatch,
)
from chat.store.errors import opening
from chat.store.sqlite import open_private, transaction

# refresh_families.revoked: 0 live, or why it was revoked (the refusal code depends on it)
FAMILY_REVOKED = 1  # the operator blocked the identity
FAMILY_REUSED = 2  # a spent token was presented again: theft (PROTOCOL.md §7)
FAMILY_REPLACED = 3  # more families than the identity may have: a newer login replaced it

REFRESH_TOKEN_BYTES = 32  # 256 random bits: unguessable, so an unsalted SHA-256 suffices
FAMILY_ID_BYTES = 16  # a family id is not a secret; it only has to be unique
MAX_REFRESH_CHARS = 256  # ours are 43 characters; anything far longer is not one of ours
# Spent tokens a family keeps to recognise a replay. The replay that matters is of the token
# spent last (the owner's after a thief refreshed first, or the reverse); an older one is
# refused anyway, as unknown (invalid_refresh), once forgotten.
MAX_SPENT_KEPT = 32
# A revoked jti row outlives its token's exp by this much: verifiers accept exp + clock leeway.
JTI_RETENTION_MARGIN = 300.0
VERSION_KEY = "revocation_version"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS refresh_families (
        family TEXT PRIMARY KEY,
        sub TEXT NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS refresh_families_sub ON refresh_families (sub)",
    """CREATE TABLE IF NOT EXISTS refresh_tokens (
        hash TEXT PRIMARY KEY,
        family TEXT NOT NULL REFERENCES refresh_families (family),
        sub TEXT NOT NULL,
        x5t TEXT NOT NULL,
        expires REAL NOT NULL,
        spent INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family)",
    "CREATE TABLE IF NOT EXISTS revoked_subs (sub TEXT PRIMARY KEY, revoked_at REAL NOT NULL)",
    # Identities whose block was lifted, and when it was last set: kept for good (an operator
    # command each), as tokens from a trusted issuer may live long.
    "CREATE TABLE IF NOT EXISTS lifted_subs (sub TEXT PRIMARY KEY, revoked_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS revoked_jtis (jti TEXT PRIMARY KEY, exp REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_NONE_LIFTED: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Revocations:
    """Every revoked identity and access token as of one value of the revocation counter;
    `lifted`: identities unblocked again, with when they were last revoked."""

    version: int
    subs: frozenset[str] = frozenset()
    jtis: frozenset[str] = frozenset()
    lifted: Mapping[str, float] = field(default_factory=lambda: _NONE_LIFTED)

    def is_revoked(self, claims: Claims) -> bool:
        """Whether this access token, or its whole identity, has been revoked. Lifting an
        identity's block does not bring back its tokens issued before the revocation; `iat`
        is whole seconds, so one issued in the second of the revocation stays refused too."""
        if claims.sub in self.subs or claims.jti in self.jtis:
            return True
        revoked_at = self.lifted.get(claims.sub)
        return revoked_at is not None and claims.iat <= revoked_at

    def is_identity_revoked(self, sub: str) -> bool:
        return sub in self.subs


_NOTHING_LOADED = Revocations(-1)  # the counter starts at 0: the first load always reads


class StateStore:
    """Refresh tokens and revocations in one SQLite file, safe to share between processes
    and between threads."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.Lock()  # one thread at a time on the connection
        self._revocations = _NOTHING_LOADED

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> StateStore:
        """Open (or create) the state file in WAL mode with its schema; load the revocations.

        Raises `StoreUnusable` when it cannot, `StoreMissing` when `create` is False and
        there is no state file."""
        with opening("the token state", path):
            db = open_private(path, create=create)
            store = cls(db)
            with store._write():
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(
                    "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", (VERSION_KEY,)
                )
            store.load_revocations()
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    # ------------------------------------------------------------------ refresh tokens

    def issue_refresh(
        self, sub: str, x5t: str, now: float, lifetime: float, max_families: int | None = None
    ) -> str:
        """A refresh token starting a new family, bound to (sub, x5t); with `max_families`,
        the identity's oldest live families beyond it are replaced."""
        family = secrets.token_urlsafe(FAMILY_ID_BYTES)
        with self._write() as db:
            if self._sub_revoked(sub):
                raise IdentityRevoked(f"identity '{sub}' is revoked on this server")
            db.execute("INSERT INTO refresh_families (family, sub) VALUES (?, ?)", (family, sub))
            token = self._insert_refresh(family, sub, x5t, now + lifetime)
            if max_families is not None:
                self._bound_families(sub, max_families)
            return token

    def rotate_refresh(self, token: str, sub: str, x5t: str, now: float, lifetime: float) -> str:
        """Spend `token` and return its successor in the same family (PROTOCOL.md §7)."""
        with self._write():
            row = self._refresh_row(token)
            refusal = self._refusal(row, sub, x5t, now)
            if isinstance(refusal, RefreshReused):
                assert row is not None  # an unknown token is InvalidRefresh
                self._revoke_family(row[0])  # committed: the refusal is raised after COMMIT
            elif refusal is None:
                assert row is not None
                self._db.execute(
                    "UPDATE refresh_tokens SET spent = 1 WHERE hash = ?", (_digest(token),)
                )
                successor = self._insert_refresh(row[0], sub, x5t, now + lifetime)
                self._forget_old_spent(row[0])
                return successor
        raise refusal

    def _refresh_row(self, token: str) -> tuple[str, str, str, float, int, int] | None:
        """(family, sub, x5t, expires, spent, family revoked or sub blocked) of `token`."""
        if not token or len(token) > MAX_REFRESH_CHARS or not token.isascii():
            return None
        row: tuple[str, str, str, float, int, int] | None = self._db.execute(
            "SELECT t.family, t.sub, t.x5t, t.expires, t.spent,"
            " CASE WHEN EXISTS (SELECT 1 FROM revoked_subs r WHERE r.sub = t.sub)"
            f" THEN {FAMILY_REVOKED} ELSE f.revoked END"
            " FROM refresh_tokens t JOIN refresh_families f ON f.family = t.family"
            " WHERE t.hash = ?",
            (_digest(token),),
        ).fetchone()
        return row

    @staticmethod
    def _refusal(
        row: tuple[str, str, str, float, int, int] | None, sub: str, x5t: str, now: float
    ) -> HttpRefusal | None:
        """Why a presented refresh token is refused, checked in this order, or None."""
        if row is None:
            return InvalidRefresh("unknown refresh token")
        _family, bound_sub, bound_x5t, expires, spent, revoked = row
        if revoked == FAMILY_REUSED:  # tell the owner too: someone else spent one of theirs
            return RefreshReused("a refresh token of this family was used twice; it is revoked")
        if revoked == FAMILY_REVOKED:
            return InvalidRefresh("refresh token family has been revoked")
        if (bound_sub, bound_x5t) != (sub, x5t):
            return TokenCertMismatch("refresh token was issued to another certificate")
        if spent:
            return RefreshReused("refresh token was already used; its family is now revoked")
        if expires <= now:
            return RefreshExpired("refresh token has expired")
        if revoked == FAMILY_REPLACED:
            return RefreshExpired(
                "refresh token replaced by a newer login of the same identity (the server keeps"
                " a limited number per identity); get a new one with POST /auth/token"
            )
        return None

    def _insert_refresh(self, family: str, sub: str, x5t: str, expires: float) -> str:
        token = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
        self._db.execute(
            "INSERT INTO refresh_tokens (hash, family, sub, x5t, expires) VALUES (?, ?, ?, ?, ?)",
            (_digest(token), family, sub, x5t, expires),
        )
        return token

    def _bound_families(self, sub: str, keep: int) -> None:
        """Replace `sub`'s live families beyond the newest `keep`; forget its dead ones beyond
        the newest `keep` (their tokens then answer as unknown)."""
        self._db.execute(
            "UPDATE refresh_families SET revoked = ? WHERE family IN (SELECT family FROM"
            " refresh_families WHERE sub = ? AND revoked = 0 ORDER BY rowid DESC LIMIT -1"
            " OFFSET ?)",
            (FAMILY_REPLACED, sub, keep),
        )
        dead = (
            "SELECT family FROM refresh_families WHERE sub = ? AND revoked != 0"
            " ORDER BY rowid DESC LIMIT -1 OFFSET ?"
        )
        self._db.execute(f"DELETE FROM refresh_tokens WHERE family IN ({dead})", (sub, keep))
        self._db.execute(f"DELETE FROM refresh_families WHERE family IN ({dead})", (sub, keep))

    def _forget_old_spent(self, family: str) -> None:
        self._db.execute(
            "DELETE FROM refresh_tokens WHERE family = ? AND spent = 1 AND rowid NOT IN"
            " (SELECT rowid FROM refresh_tokens WHERE family = ? AND spent = 1"
            " ORDER BY rowid DESC LIMIT ?)",
            (family, family, MAX_SPENT_KEPT),
        )

    def _revoke_family(self, family: str) -> None:
        self._db.execute(
            "UPDATE refresh_families SET revoked = ? WHERE family = ?", (FAMILY_REUSED, family)
        )

    # ------------------------------------------------------------------ revocations

    def revoke_sub(self, sub: str, now: float) -> None:
        """Block an identity: its access tokens, its refresh families, the token endpoint.
        Revoking it again moves the time its tokens must be issued after."""
        with self._write() as db:
            db.execute(
                "INSERT INTO revoked_subs (sub, revoked_at) VALUES (?, ?) ON CONFLICT (sub)"
                " DO UPDATE SET revoked_at = max(revoked_at, excluded.revoked_at)",
                (sub, now),
            )
            db.execute(
                "UPDATE refresh_families SET revoked = ? WHERE sub = ? AND revoked = 0",
                (FAMILY_REVOKED, sub),
            )
            self._bump_version()
        self.load_revocations()

    def unrevoke_sub(self, sub: str) -> bool:
        """Lift an identity block; False if none. Its revoked refresh families stay revoked,
        and its access tokens issued before the revocation stay refused."""
        with self._write() as db:
            db.execute(
                "INSERT INTO lifted_subs (sub, revoked_at) SELECT sub, revoked_at FROM"
                " revoked_subs WHERE sub = ? ON CONFLICT (sub)"
                " DO UPDATE SET revoked_at = max(revoked_at, excluded.revoked_at)",
                (sub,),
            )
            removed = db.execute("DELETE FROM revoked_subs WHERE sub = ?", (sub,)).rowcount > 0
            if removed:
                self._bump_version()
        self.load_revocations()
        return removed

    def revoke_jti(self, jti: str, exp: float) -> None:
        """Revoke one access token; the row may go once the token could no longer verify."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO revoked_jtis (jti, exp) VALUES (?, ?)", (jti, exp))
            self._bump_version()
        self.load_revocations()

    @property
    def revocations(self) -> Revocations:
        """The revocations as last loaded: read from memory, never from the database."""
        return self._revocations

    def load_revocations(self) -> Revocations:
        """Read the revocations again if the counter moved since the last load (another
        process may have revoked); one indexed read when it did not."""
        with self._lock:
            version = self._version()
            if version != self._revocations.version:
                # Read after the counter: a change committed in between is in the sets already
                # and moves the counter again, so the next load reads them once more.
                subs = self._db.execute("SELECT sub FROM revoked_subs").fetchall()
                jtis = self._db.execute("SELECT jti FROM revoked_jtis").fetchall()
                lifted = self._db.execute("SELECT sub, revoked_at FROM lifted_subs").fetchall()
                self._revocations = Revocations(
                    version,
                    frozenset(sub for (sub,) in subs),
                    frozenset(jti for (jti,) in jtis),
                    MappingProxyType(dict(lifted)),
                )
            return self._revocations

    def is_revoked(self, claims: Claims) -> bool:
        """Whether this access token, or its whole identity, is revoked now (reads the file)."""
        return self.load_revocations().is_revoked(claims)

    def is_identity_revoked(self, sub: str) -> bool:
        """Whether the identity is blocked now (reads the file)."""
        return self.load_revocations().is_identity_revoked(sub)

    def revocation_version(self) -> int:
        """A counter that moves on every revocation change; one indexed read, cheap to poll."""
        with self._lock:
            return self._version()

    def _version(self) -> int:
        value: int
        (value,) = self._db.execute(
            "SELECT value FROM counters WHERE name = ?", (VERSION_KEY,)
        ).fetchone()
        return value

    def prune(self, now: float) -> None:
        """Drop expired refresh tokens, emptied families and jti rows past any possible use."""
        with self._write() as db:
            db.execute("DELETE FROM refresh_tokens WHERE expires <= ?", (now,))
            db.execute(
                "DELETE FROM refresh_families WHERE family NOT IN"
                " (SELECT family FROM refresh_tokens)"
            )
            dropped = db.execute(
                "DELETE FROM revoked_jtis WHERE exp + ? <= ?", (JTI_RETENTION_MARGIN, now)
            ).rowcount
            if dropped:  # snapshots forget them too, and stay small
                self._bump_version()
        self.load_revocations()

    def _sub_revoked(self, sub: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM revoked_subs WHERE sub = ?", (sub,)).fetchone()
            is not None
        )

    def _bump_version(self) -> None:
        self._db.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (VERSION_KEY,))
