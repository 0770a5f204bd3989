"""The durable side of per-topic history (PROTOCOL.md §8): the records and the SQLite file.

How this works: each topic row holds its epoch and last committed offset; each message row is
keyed by (destination, offset); pruning is by offset range (count) and by a timestamp index
(age), so it costs little per batch. `write()` takes one `Batch` (what a group commit
gathered: messages, and topics minted with no message yet, which keep their epoch as a row
with last offset 0) and writes it in one transaction (WAL, `synchronous=FULL`: a committed
message survives a crash). `load()` prunes what retention no longer keeps and reads every
topic back with its retained tail. The in-memory index that assigns offsets and serves
replays is `chat.history.History`. BLOCKING: SQLite; the server calls it from a worker
thread. Pure module: no trio.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from chat.store.sqlite import open_private, transaction

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS topics (
        destination TEXT PRIMARY KEY,
        epoch TEXT NOT NULL,
        last_offset INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS messages (
        destination TEXT NOT NULL,
        offset INTEGER NOT NULL,
        epoch TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        sender TEXT NOT NULL,
        content_type TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (destination, offset))""",
    "CREATE INDEX IF NOT EXISTS messages_age ON messages (timestamp_ms)",
)
_INSERT = (
    "INSERT OR REPLACE INTO messages (destination, offset, epoch, timestamp_ms, sender,"
    " content_type, headers, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_TOPIC = (
    "INSERT INTO topics (destination, epoch, last_offset) VALUES (?, ?, ?)"
    " ON CONFLICT (destination) DO UPDATE SET epoch = excluded.epoch,"
    " last_offset = excluded.last_offset"
)
# A topic that has no message yet keeps its epoch; a real row (with messages) is never touched.
_INSERT_QUIET_TOPIC = (
    "INSERT INTO topics (destination, epoch, last_offset) VALUES (?, ?, 0)"
    " ON CONFLICT (destination) DO NOTHING"
)
_PRUNE_COUNT = "DELETE FROM messages WHERE destination = ? AND offset <= ?"
_PRUNE_AGE = "DELETE FROM messages WHERE timestamp_ms < ?"
_LOAD = (
    "SELECT m.destination, m.offset, m.timestamp_ms, m.sender, m.content_type, m.headers, m.body"
    " FROM messages m JOIN topics t ON t.destination = m.destination"
    " WHERE m.offset > t.last_offset - ? ORDER BY m.destination, m.offset"
)


@dataclass(frozen=True, slots=True)
class Retention:
    """How much history is kept: per topic (PROTOCOL.md §8: count, age, bytes), and in memory
    for all topics together (bytes, topics); older retained messages are read from disk."""

    max_count: int = 1000  # per topic
    max_age: float = 7 * 86400.0  # seconds
    max_bytes: int = 16 * 1024 * 1024  # per topic
    memory_bytes: int = 64 * 1024 * 1024  # message bytes in memory, all topics
    max_topics: int = 100_000  # topics in memory

    def __post_init__(self) -> None:
        if min(self.max_count, self.max_age, self.max_bytes, self.memory_bytes) < 0:
            raise ValueError(f"retention limits must not be negative: {self}")
        if self.max_topics < 1:
            raise ValueError(f"at least one topic must fit in memory: {self}")


@dataclass(frozen=True, slots=True)
class Stored:
    """One published message with its place in its topic's history."""

    destination: str
    offset: int
    epoch: str
    timestamp_ms: int
    sender: str
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...]  # user headers passed through to MESSAGE
    seq: int  # store-wide append sequence number (durability tracking); 0 when loaded from disk


@dataclass(frozen=True, slots=True)
class Batch:
    """What one group commit writes: appended messages and topics minted with no message yet."""

    messages: list[Stored]
    topics: list[tuple[str, str]]  # (destination, epoch) minted by `position()`
    seq: int  # every append and mint with a seq up to this one is in this batch or an earlier one

    def __bool__(self) -> bool:
        return bool(self.messages or self.topics)


@dataclass(frozen=True, slots=True)
class TopicState:
    """One topic as loaded from disk."""

    destination: str
    epoch: str
    last_offset: int
    messages: tuple[Stored, ...]  # the retained tail, contiguous offsets ending at last_offset


def _headers_json(headers: tuple[tuple[str, str], ...]) -> str:
    return json.dumps(headers) if headers else "[]"


def _row(message: Stored) -> tuple[str, int, str, int, str, str, str, bytes]:
    return (
        message.destination,
        message.offset,
        message.epoch,
        message.timestamp_ms,
        message.sender,
        message.content_type,
        _headers_json(message.headers),
        message.body,
    )


class SqliteBackend:
    """The durable side: one SQLite file and one connection, used by one thread at a time."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.Lock()  # one thread at a time on the connection
        self._closed = False

    @classmethod
    def open(cls, path: Path) -> SqliteBackend:
        """Open (or create, mode 0600) the history file in WAL mode with its schema."""
        db = open_private(path)
        backend = cls(db)
        with transaction(db, backend._lock):
            for statement in _SCHEMA:
                db.execute(statement)
        return backend

    def load(self, retention: Retention, now_ms: int) -> list[TopicState]:
        """Prune what retention no longer keeps, then read every topic."""
        with transaction(self._db, self._lock) as db:
            db.execute(_PRUNE_AGE, (now_ms - retention.max_age * 1000.0,))
            db.execute(
                "DELETE FROM messages WHERE offset <= (SELECT t.last_offset FROM topics t"
                " WHERE t.destination = messages.destination) - ?",
                (retention.max_count,),
            )
            return self._read(db, retention)

    @staticmethod
    def _read(db: sqlite3.Connection, retention: Retention) -> list[TopicState]:
        topics = {
            d: (e, last)
            for d, e, last in db.execute("SELECT destination, epoch, last_offset FROM topics")
        }
        tails: dict[str, list[Stored]] = {d: [] for d in topics}
        for destination, offset, ts, sender, ctype, headers, body in db.execute(
            _LOAD, (retention.max_count,)
        ):
            tail = tails[destination]
            if tail and tail[-1].offset != offset - 1:
                tail.clear()  # keep only the contiguous run ending at the last offset
            pairs = tuple((name, value) for name, value in json.loads(headers))
            epoch = topics[destination][0]
            tail.append(Stored(destination, offset, epoch, ts, sender, ctype, body, pairs, 0))
        return [
            TopicState(d, epoch, last, _contiguous_tail(tails[d], last))
            for d, (epoch, last) in topics.items()
        ]

    def write(self, batch: Batch, retention: Retention) -> None:
        """Write one batch, its topics' epochs and last offsets, and prune: one transaction."""
        with transaction(self._db, self._lock) as db:
            db.executemany(_INSERT_QUIET_TOPIC, batch.topics)  # first: messages then update it
            if batch.messages:
                self._write_messages(db, batch.messages, retention)

    @staticmethod
    def _write_messages(db: sqlite3.Connection, batch: list[Stored], retention: Retention) -> None:
        last: dict[str, Stored] = {message.destination: message for message in batch}
        db.executemany(_INSERT, map(_row, batch))
        db.executemany(_UPSERT_TOPIC, ((d, m.epoch, m.offset) for d, m in last.items()))
        db.executemany(
            _PRUNE_COUNT,
            (
                (d, m.offset - retention.max_count)
                for d, m in last.items()
                if m.offset > retention.max_count
            ),
        )
        newest = max(message.timestamp_ms for message in batch)
        db.execute(_PRUNE_AGE, (newest - retention.max_age * 1000.0,))

    def close(self) -> None:
        """Close; call only once every append was written."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()


def _contiguous_tail(tail: list[Stored], last_offset: int) -> tuple[Stored, ...]:
    if tail and tail[-1].offset != last_offset:
        return ()  # the newest rows are missing: nothing retained joins up with what comes next
    return tuple(tail)
