"""The durable side of per-topic history (PROTOCOL.md §8): the records and the SQLite file.

How this works: each topic row holds its epoch and last committed offset; each message row is
keyed by (destination, offset); pruning is by offset range (count, and bytes: the newest
messages whose bodies fit `max_bytes`) and by a timestamp index (age), so it costs little per
batch. `write()` takes one `Batch` (what a group commit gathered: messages, and topics minted
with no message yet, which keep their epoch as a row with last offset 0), writes it in one
transaction (WAL, `synchronous=FULL`: a committed message survives a crash) and says how far
each topic's history was pruned, so the in-memory index agrees with the file.

`load()` prunes what retention no longer keeps and reads back what the in-memory index may
hold: the epoch, last offset and first retained offset of the most recently used topics (at
most `max_topics`), and the newest message bodies that fit `memory_bytes`; the rest stays on
disk and is read on demand (`read_range`, `read_topics`). The in-memory index that assigns
offsets and serves replays is `chat.history.History`. BLOCKING: SQLite; the server calls it
from a worker thread. Pure module: no trio.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
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
_PRUNE_UP_TO = "DELETE FROM messages WHERE destination = ? AND offset <= ?"
_PRUNE_AGE = "DELETE FROM messages WHERE timestamp_ms < ? RETURNING destination, offset"
# The newest offset whose body, with every newer one's, no longer fits the topic's bytes.
_OVER_BYTES = (
    "SELECT offset FROM (SELECT offset, SUM(LENGTH(body)) OVER (ORDER BY offset DESC) AS total"
    " FROM messages WHERE destination = ?) WHERE total > ? ORDER BY offset DESC LIMIT 1"
)
_PRUNE_COUNT_ALL = (
    "DELETE FROM messages WHERE offset <= (SELECT t.last_offset FROM topics t"
    " WHERE t.destination = messages.destination) - ?"
)
_PRUNE_BYTES_ALL = (
    "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM (SELECT rowid, SUM(LENGTH(body))"
    " OVER (PARTITION BY destination ORDER BY offset DESC) AS total FROM messages)"
    " WHERE total > ?)"
)
_TOPIC_COLUMNS = (
    "t.destination, t.epoch, t.last_offset,"
    " (SELECT MIN(f.offset) FROM messages f WHERE f.destination = t.destination)"
)
# Most recently used first: by the time of the topic's newest message (quiet topics last).
_RECENT_TOPICS = (
    f"SELECT {_TOPIC_COLUMNS} FROM topics t LEFT JOIN messages m"
    " ON m.destination = t.destination AND m.offset = t.last_offset"
    " ORDER BY m.timestamp_ms DESC LIMIT ?"
)
_ONE_TOPIC = f"SELECT {_TOPIC_COLUMNS} FROM topics t WHERE t.destination = ?"
_MESSAGE_COLUMNS = "destination, offset, epoch, timestamp_ms, sender, content_type, headers, body"
_NEWEST_FIRST = f"SELECT {_MESSAGE_COLUMNS} FROM messages ORDER BY timestamp_ms DESC"
_RANGE = (
    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE destination = ? AND offset > ?"
    " AND offset <= ? ORDER BY offset"
)
MESSAGE_OVERHEAD = 400  # bytes of a retained message in memory besides its body and headers
HEADER_OVERHEAD = 120  # bytes of one user header in memory besides its text

Row = tuple[str, int, str, int, str, str, str, bytes]
Pruned = dict[str, int]  # destination -> every offset up to this one is gone


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


def footprint(message: Stored) -> int:
    """What a retained message costs in memory, as the history's byte budget counts it."""
    headers = sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in message.headers)
    return MESSAGE_OVERHEAD + len(message.body) + headers


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
    """One topic as read from disk."""

    destination: str
    epoch: str
    last_offset: int
    first_offset: int  # the oldest retained offset (last_offset + 1: none retained)
    messages: tuple[Stored, ...] = ()  # the newest retained messages, ending at last_offset


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `load()` read: the topics that fit in memory, and whether that is all of them."""

    topics: list[TopicState]
    complete: bool  # False: more topics are on disk, read them with `read_topics`


def _headers_json(headers: tuple[tuple[str, str], ...]) -> str:
    return json.dumps(headers) if headers else "[]"


def _row(message: Stored) -> Row:
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


def _stored(row: Row) -> Stored:
    destination, offset, epoch, ts, sender, ctype, headers, body = row
    pairs = tuple((name, value) for name, value in json.loads(headers))
    return Stored(destination, offset, epoch, ts, sender, ctype, body, pairs, 0)


def _topic_state(row: tuple[str, str, int, int | None]) -> TopicState:
    destination, epoch, last, first = row
    return TopicState(destination, epoch, last, last + 1 if first is None else first)


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

    def load(self, retention: Retention, now_ms: int) -> Loaded:
        """Prune what retention no longer keeps, then read what fits in memory."""
        with transaction(self._db, self._lock) as db:
            db.execute(_PRUNE_AGE, (now_ms - retention.max_age * 1000.0,)).fetchall()
            db.execute(_PRUNE_COUNT_ALL, (retention.max_count,))
            db.execute(_PRUNE_BYTES_ALL, (retention.max_bytes,))
            rows = db.execute(_RECENT_TOPICS, (retention.max_topics + 1,)).fetchall()
            states = {row[0]: _topic_state(row) for row in rows[: retention.max_topics]}
            tails = _newest_bodies(db.execute(_NEWEST_FIRST), states, retention.memory_bytes)
        topics = [
            TopicState(d, s.epoch, s.last_offset, s.first_offset, tuple(reversed(tails[d])))
            if d in tails
            else s
            for d, s in states.items()
        ]
        return Loaded(topics, len(rows) <= retention.max_topics)

    def read_topics(self, destinations: Iterable[str]) -> list[TopicState]:
        """The topics among `destinations` that are on disk (epochs and offsets, no bodies)."""
        with self._lock:
            return [
                _topic_state(row)
                for destination in destinations
                for row in self._db.execute(_ONE_TOPIC, (destination,))
            ]

    def read_range(self, destination: str, after: int, until: int, max_bytes: int) -> list[Stored]:
        """The messages after offset `after` up to `until`, oldest first, contiguous, their
        bodies about `max_bytes` (at least one message, if the next one is there)."""
        page: list[Stored] = []
        size = 0
        with self._lock:
            for row in self._db.execute(_RANGE, (destination, after, until)):
                if row[1] != after + len(page) + 1 or size >= max_bytes:
                    break  # a hole: what follows is not contiguous with what was sent
                page.append(_stored(row))
                size += len(row[7])
        return page

    def write(self, batch: Batch, retention: Retention) -> Pruned:
        """Write one batch, its topics' epochs and last offsets, and prune: one transaction.

        Returns how far each pruned topic's history is gone.
        """
        with transaction(self._db, self._lock) as db:
            db.executemany(_INSERT_QUIET_TOPIC, batch.topics)  # first: messages then update it
            if not batch.messages:
                return {}
            return self._write_messages(db, batch.messages, retention)

    @staticmethod
    def _write_messages(
        db: sqlite3.Connection, batch: list[Stored], retention: Retention
    ) -> Pruned:
        last: dict[str, Stored] = {message.destination: message for message in batch}
        db.executemany(_INSERT, map(_row, batch))
        db.executemany(_UPSERT_TOPIC, ((d, m.epoch, m.offset) for d, m in last.items()))
        pruned: Pruned = {}
        for destination, message in last.items():
            gone = message.offset - retention.max_count
            over = db.execute(_OVER_BYTES, (destination, retention.max_bytes)).fetchone()
            if over is not None:
                gone = max(gone, over[0])
            if gone > 0:
                db.execute(_PRUNE_UP_TO, (destination, gone))
                pruned[destination] = gone
        newest = max(message.timestamp_ms for message in batch)
        for destination, offset in db.execute(_PRUNE_AGE, (newest - retention.max_age * 1000.0,)):
            pruned[destination] = max(pruned.get(destination, 0), offset)
        return pruned

    def close(self) -> None:
        """Close; call only once every append was written."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()


def _newest_bodies(
    rows: Iterable[Row], states: dict[str, TopicState], budget: int
) -> dict[str, list[Stored]]:
    """The newest messages of the topics in `states`, newest first, while they fit `budget`:
    each topic's list is a contiguous run ending at its last offset."""
    tails: dict[str, list[Stored]] = {}
    closed: set[str] = set()
    for row in rows:
        destination, offset = row[0], row[1]
        state = states.get(destination)
        if state is None or destination in closed:
            continue
        tail = tails.setdefault(destination, [])
        if offset != state.last_offset - len(tail):
            closed.add(destination)  # a hole (or a row out of order): older ones stay on disk
            continue
        message = _stored(row)
        budget -= footprint(message)
        if budget < 0:
            break
        tail.append(message)
    return tails
