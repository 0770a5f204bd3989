"""Per-topic message history: offsets, epochs, retention, replay (PROTOCOL.md §8).

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
`committed_seq >= seq`. A topic minted by `position()` (a SUBSCRIBE to a room with no message
yet) is queued too, so the epoch that SUBSCRIBE's RECEIPT names survives a restart. The file
itself, and the records that go to it and come back (`Stored`, `Batch`, `Retention`), are
`chat.store.history`; this module is the in-memory index the event loop works with.

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

import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from chat.store.errors import opening
from chat.store.history import Batch, Retention, SqliteBackend, Stored

EPOCH_BYTES = 6  # 12 hex characters: an epoch only has to differ from its topic's earlier ones
DEFAULT_RETENTION = Retention()


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


def new_epoch() -> str:
    """A fresh id for a topic's history, minted when everything before it may be lost."""
    return secrets.token_hex(EPOCH_BYTES)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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

    Everything but `commit()` and `close()` runs on the event loop; those two, and opening
    (which loads the file), touch only SQLite.
    """

    def __init__(
        self, retention: Retention = DEFAULT_RETENTION, backend: SqliteBackend | None = None
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
    def memory(cls, retention: Retention = DEFAULT_RETENTION) -> History:
        """History that lives and dies with the process (every restart is a new epoch)."""
        return cls(retention)

    @classmethod
    def open_sqlite(cls, path: Path, retention: Retention = DEFAULT_RETENTION) -> History:
        """History stored in SQLite at `path`, loaded from it (`StoreUnusable` if it cannot be)."""
        with opening("the message history", path):
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
