"""Per-topic message history: offsets, epochs, retention, replay, durable storage (PROTOCOL.md §8).

How this works: every published message gets its topic's next `offset` (1, 2, ...) under the
topic's `epoch`, an opaque id of that topic's history. Offsets are assigned synchronously, in
memory, when the message is published, and the retained tail of each topic (at most
`max_count` messages, none older than `max_age`) lives in a deque, so `read()` is
synchronous and a subscriber's replay plus live fan-out has no gap and no duplicate.

Durability is asynchronous (group commit): `append()` also queues the message; a committer
(a trio task in the server, calling `commit()` from a worker thread) takes the queued batch
with `take_pending()`, writes it to SQLite in one transaction (WAL, `synchronous=FULL`, so a
committed message survives a crash of the server) and then calls `mark_committed()`. Every
append carries a store-wide `seq`; the server sends a SEND's RECEIPT only once
`committed_seq >= seq`. On disk, each topic row holds its epoch and last committed offset; each
message row is keyed by (destination, offset); pruning is by offset range (count) and by a
timestamp index (age), so it costs little per batch. A topic minted by `position()` (a
SUBSCRIBE to a room with no message yet) is queued too, as a row with last offset 0, so the
epoch that SUBSCRIBE's RECEIPT names survives a restart.

Replays are read in pages: `resume()` or `tail()` say where a subscriber's replay starts,
and `read()` returns the committed messages after the offset it has reached so far, or
raises `HistoryGap` when retention dropped some it has not been sent yet.

On startup the store loads every topic's epoch, last offset and retained tail: offsets continue
and epochs are unchanged, also after a crash. That is safe because the server shows a message
to nobody before it is committed (the high-water mark: `read` and `position` see only
committed messages, and live fan-out waits for the commit), so an offset lost in a crash was
never seen and may be given again. A memory store loses everything when the process ends, so
every topic gets a new epoch then (a fresh random one is minted on first use). Pure module: no trio.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from chat.sqlite import open_private

EPOCH_BYTES = 6  # 12 hex characters: an epoch only has to differ from its topic's earlier ones

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
    """How much history each topic keeps (PROTOCOL.md §8: count and age)."""

    max_count: int = 1000  # per topic
    max_age: float = 7 * 86400.0  # seconds

    def __post_init__(self) -> None:
        if self.max_count < 0 or self.max_age < 0:
            raise ValueError(f"retention limits must not be negative: {self}")


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
class Position:
    """Where a subscription made now starts (PROTOCOL.md §8: the SUBSCRIBE RECEIPT says it)."""

    epoch: str
    offset: int  # the topic's last committed offset
    durable_seq: int  # the epoch survives a crash once every append up to this seq is committed


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a resuming subscriber's replay starts."""

    after: int  # replay the committed messages with a greater offset
    recovered: bool  # False when the epoch differs or messages after `since` are gone


class HistoryGap(LookupError):
    """Messages a replay has not sent yet are no longer retained (or the epoch changed)."""


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


def new_epoch() -> str:
    """A fresh id for a topic's history, minted when everything before it may be lost."""
    return secrets.token_hex(EPOCH_BYTES)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
        self._lock = threading.Lock()  # commit() runs in a worker thread; close() may not
        self._closed = False

    @classmethod
    def open(cls, path: Path) -> SqliteBackend:
        """Open (or create, mode 0600) the history file in WAL mode with its schema."""
        db = open_private(path)
        backend = cls(db)
        with backend._transaction():
            for statement in _SCHEMA:
                db.execute(statement)
        return backend

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def load(self, retention: Retention, now_ms: int) -> list[TopicState]:
        """Prune what retention no longer keeps, then read every topic."""
        with self._transaction() as db:
            db.execute(_PRUNE_AGE, (now_ms - retention.max_age * 1000.0,))
            db.execute(
                "DELETE FROM messages WHERE offset <= (SELECT t.last_offset FROM topics t"
                " WHERE t.destination = messages.destination) - ?",
                (retention.max_count,),
            )
            return self._read(db, retention)

    @staticmethod
    def _read(db: sqlite3.Connection, retention: Retention) -> list[TopicState]:
        topics = {d: (e, last) for d, e, last in db.execute(
            "SELECT destination, epoch, last_offset FROM topics"
        )}
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
        with self._transaction() as db:
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
            ((d, m.offset - retention.max_count) for d, m in last.items()
             if m.offset > retention.max_count),
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


class _Topic:
    """One topic's live state; touched only by the event loop."""

    __slots__ = ("durable_seq", "epoch", "last", "retained")

    def __init__(
        self, epoch: str, last: int, retained: Iterable[Stored], max_count: int, durable_seq: int
    ) -> None:
        self.epoch = epoch
        self.last = last
        self.retained: deque[Stored] = deque(retained, maxlen=max_count)
        self.durable_seq = durable_seq  # the append (or mint) whose commit makes the epoch durable


class History:
    """In-memory index of retained messages, with an optional durable backend.

    Everything but `commit()` runs on the event loop; `commit()` touches only SQLite.
    """

    def __init__(
        self, retention: Retention = Retention(), backend: SqliteBackend | None = None
    ) -> None:
        self._retention = retention
        self._max_age_ms = retention.max_age * 1000.0
        self._backend = backend
        self._topics: dict[str, _Topic] = {}
        self._pending: list[Stored] = []
        self._pending_topics: list[tuple[str, str]] = []
        self._seq = 0
        self._committed = 0
        if backend is not None:
            for state in backend.load(retention, _now_ms()):
                self._topics[state.destination] = _Topic(
                    state.epoch, state.last_offset, state.messages, retention.max_count, 0
                )

    @classmethod
    def memory(cls, retention: Retention = Retention()) -> History:
        """History that lives and dies with the process (every restart is a new epoch)."""
        return cls(retention)

    @classmethod
    def open_sqlite(cls, path: Path, retention: Retention = Retention()) -> History:
        """History stored in SQLite at `path`, loaded from it."""
        return cls(retention, SqliteBackend.open(path))

    @property
    def durable(self) -> bool:
        return self._backend is not None

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def committed_seq(self) -> int:
        """Every append with `seq <= committed_seq` is durable (a memory store has no disk)."""
        return self._committed if self._backend is not None else self._seq

    def epoch(self, destination: str) -> str:
        """The topic's current epoch, minting one for a topic seen for the first time."""
        return self._topic(destination).epoch

    def position(self, destination: str) -> Position:
        """Where a subscription made now starts.

        A topic minted here, with no message yet, has its epoch queued for the committer: a
        client told this epoch resumes with `recovered:true` after a restart (a memory store
        has no disk, so it mints a new epoch per process, truly having lost history).
        """
        topic = self._topic(destination)
        return Position(topic.epoch, self._high_water(topic), topic.durable_seq)

    def _topic(self, destination: str) -> _Topic:
        """The topic, minted (and its epoch queued for disk) when seen for the first time."""
        topic = self._topics.get(destination)
        if topic is not None:
            return topic
        topic = self._new_topic(destination, 0)
        if self._backend is not None:
            self._seq = topic.durable_seq = self._seq + 1
            self._pending_topics.append((destination, topic.epoch))
        return topic

    def _new_topic(self, destination: str, durable_seq: int) -> _Topic:
        topic = self._topics[destination] = _Topic(
            new_epoch(), 0, (), self._retention.max_count, durable_seq
        )
        return topic

    def append(
        self,
        destination: str,
        sender: str,
        content_type: str,
        body: bytes,
        headers: tuple[tuple[str, str], ...],
        timestamp_ms: int,
    ) -> Stored:
        """Give a published message its offset, retain it and queue it for the committer."""
        self._seq = seq = self._seq + 1
        topic = self._topics.get(destination) or self._new_topic(destination, seq)
        topic.last = offset = topic.last + 1
        stored = Stored(
            destination, offset, topic.epoch, timestamp_ms, sender, content_type, body, headers, seq
        )
        retained = topic.retained
        retained.append(stored)  # the deque's maxlen drops the oldest: retention by count
        if retained and retained[0].timestamp_ms < timestamp_ms - self._max_age_ms:
            self._expire(retained, timestamp_ms)
        if self._backend is not None:
            self._pending.append(stored)
        return stored

    def _expire(self, retained: deque[Stored], now_ms: int) -> None:
        cutoff = now_ms - self._max_age_ms
        while retained and retained[0].timestamp_ms < cutoff:
            retained.popleft()

    def resume(self, destination: str, since: int, epoch: str | None, now_ms: int) -> Resume:
        """Where the replay of a subscriber resuming after offset `since` of `epoch` starts."""
        topic = self._topic(destination)
        first, last = self._window(topic, now_ms)
        if epoch is not None and epoch != topic.epoch:  # another history: all we have, unrecovered
            return Resume(first - 1, False)
        if since > last:  # the client is ahead of this history: it cannot be ours
            return Resume(last, False)
        return Resume(max(since, first - 1), first <= since + 1)

    def tail(self, destination: str, count: int, now_ms: int) -> int:
        """Where a replay of the last `count` committed messages starts (PROTOCOL.md §11)."""
        first, last = self._window(self._topic(destination), now_ms)
        return max(last - count, first - 1)

    def read(self, destination: str, after: int, epoch: str, now_ms: int) -> Iterator[Stored]:
        """The committed messages after offset `after` of `epoch`, oldest first.

        Raises `HistoryGap` if any of them is no longer retained. Consume the iterator before
        the next append (it walks the retained deque).
        """
        topic = self._topic(destination)
        first, last = self._window(topic, now_ms)
        if epoch != topic.epoch or (after < last and first > after + 1):
            raise HistoryGap(f"{destination}: messages after {after} of epoch {epoch} are gone")
        return islice(topic.retained, max(after + 1 - first, 0), max(last + 1 - first, 0))

    def _window(self, topic: _Topic, now_ms: int) -> tuple[int, int]:
        """(first retained offset, last committed offset); retained offsets are contiguous."""
        retained = topic.retained
        self._expire(retained, now_ms)
        last = self._high_water(topic)
        return (retained[0].offset if retained else last + 1), last

    def _high_water(self, topic: _Topic) -> int:
        """The topic's last committed offset: appends not yet on disk are seen by nobody."""
        committed = self.committed_seq
        last = topic.last
        for stored in reversed(topic.retained):  # only the uncommitted tail is walked
            if stored.seq <= committed:
                break
            last = stored.offset - 1
        return last

    def take_pending(self) -> Batch:
        """The appends and mints not yet handed to the committer, oldest first (may be empty)."""
        batch = Batch(self._pending, self._pending_topics, self._seq)
        self._pending, self._pending_topics = [], []
        return batch

    def commit(self, batch: Batch) -> None:
        """BLOCKING: write `batch` in one transaction; run it in a worker thread.

        On failure nothing of the batch is written; committing the same batch again is safe.
        """
        if batch and self._backend is not None:
            self._backend.write(batch, self._retention)

    def mark_committed(self, batch: Batch) -> None:
        """Record that `batch` (taken in order by `take_pending`) is on disk."""
        if batch:
            self._committed = max(self._committed, batch.seq)

    def close(self) -> None:
        """Write whatever is still pending, then close the file.

        Call it after the committer has stopped: it commits on the calling thread.
        """
        if self._backend is None:
            return
        batch = self.take_pending()
        self.commit(batch)
        self.mark_committed(batch)
        self._backend.close()
