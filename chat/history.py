"""Per-topic message history: offsets, epochs, retention, replay (PROTOCOL.md §8).

How this works: every published message gets its topic's next `offset` (1, 2, ...) under the
topic's `epoch`, an opaque id of that topic's history. Offsets are assigned synchronously, in
memory, when the message is published. Each topic knows its oldest retained offset (`first`)
and its last committed one (the high-water mark); retention (count, age and bytes per topic)
only moves `first` up. The newest committed messages of each topic are kept in memory, in a
deque, so `read()` is synchronous and a subscriber's replay plus live fan-out has no gap and
no duplicate.

Memory is bounded twice (`Retention.memory_bytes`, `Retention.max_topics`). Messages leave
memory oldest first, from the topics least recently written, once the retained messages
cost more than `memory_bytes` (counted by `footprint()`); with a durable backend they stay
on disk and a replay that reaches them gets `OnDisk` from `read()`: the caller reads that
page with `fetch()` off the event loop, sends it and calls `read()` again. Topics leave
memory least recently used first once there are more than `max_topics`, but only when idle
(nothing of theirs waits for the committer); their epoch, offsets and history stay on disk,
and a topic that is not in memory must be read back before use: `missing()` says which,
`load_topics()` reads them (off the loop), `install()` puts them back; meanwhile the other
calls raise `NotLoaded`. Age retention of messages on disk only is the file's: it prunes at
every commit and at start, and tells which offsets it dropped, so `first` follows; a replay
may still get such a message a little past `max_age`, never a gap. A memory store has no
disk: what leaves memory is lost (and a topic that left gets a new epoch on its next use,
which is what an epoch says).

Durability is asynchronous (group commit): `append()` also queues the message; a committer
(a trio task in the server, calling `commit()` from a worker thread) takes the queued batch
with `take_pending()`, writes it to SQLite in one transaction (WAL, `synchronous=FULL`, so a
committed message survives a crash) and then calls `mark_committed()`, which makes the batch
visible: only then does a message enter its topic's deque and move the high-water mark. Every
append carries a store-wide `seq`; the server sends a SEND's RECEIPT only once
`committed_seq >= seq`. A topic minted by `position()` (a SUBSCRIBE to a room with no message
yet) is queued too, so the epoch that SUBSCRIBE's RECEIPT names survives a restart. The file
itself, and the records that go to it and come back, are `chat.store.history`; this module
is the in-memory index the event loop works with.

On startup the store loads the epoch and offsets of the most recently used topics and the
newest bodies that fit the budget. That is safe because the server shows a message to nobody
before it is committed (`read` and `position` see only committed messages, and live fan-out
waits for the commit), so an offset lost in a crash was never seen and may be given again.
Pure module: no trio.
"""

from __future__ import annotations

import heapq
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from chat.store.errors import opening
from chat.store.history import (
    Batch,
    Pruned,
    Retention,
    SqliteBackend,
    Stored,
    TopicState,
    footprint,
)

EPOCH_BYTES = 6  # 12 hex characters: an epoch only has to differ from its topic's earlier ones
DEFAULT_RETENTION = Retention()
# Topics evicted lately, remembered so that a topic read from disk while it was evicted (and
# changed) in between is not installed stale; older evictions make `install` ask again.
EVICTIONS_REMEMBERED = 4096
HEADS_SLACK = 1024  # stale entries the heap of oldest messages may hold before it is rebuilt


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


@dataclass(frozen=True, slots=True)
class DiskRead:
    """The next page of a replay, on disk only: offsets `after + 1` to `until` of `epoch`."""

    destination: str
    epoch: str
    after: int
    until: int


@dataclass(frozen=True, slots=True)
class TopicLoad:
    """Topics to read back from disk before they are used (`History.missing`)."""

    destinations: tuple[str, ...]
    ticket: int  # the eviction count when asked: a topic evicted since may have changed


class HistoryGap(LookupError):
    """Messages a replay has not sent yet are no longer retained (or the epoch changed)."""


class OnDisk(HistoryGap):
    """The replay's next messages are retained on disk only: `fetch(self.page)` them.

    A HistoryGap, so a caller that cannot read the disk fails the replay instead of
    skipping messages.
    """

    def __init__(self, page: DiskRead) -> None:
        super().__init__(f"{page.destination}: offsets {page.after + 1}-{page.until} are on disk")
        self.page = page


class NotLoaded(LookupError):
    """The topic is not in memory and may be on disk: `missing`, `load_topics`, `install`."""

    def __init__(self, destination: str) -> None:
        super().__init__(f"{destination} must be read from disk first")
        self.destination = destination


def new_epoch() -> str:
    """A fresh id for a topic's history, minted when everything before it may be lost."""
    return secrets.token_hex(EPOCH_BYTES)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Topic:
    """One topic's live state; touched only by the event loop."""

    __slots__ = (
        "body_bytes",
        "durable_seq",
        "epoch",
        "first",
        "high",
        "last",
        "last_seq",
        "name",
        "retained",
    )

    def __init__(self, name: str, epoch: str, last: int, first: int, durable_seq: int) -> None:
        self.name = name
        self.epoch = epoch
        self.last = last  # the last offset given
        self.high = last  # the last offset committed (the high-water mark)
        self.first = first  # the oldest retained offset, on disk or here
        self.retained: deque[Stored] = deque()  # committed, contiguous, ending at `high`
        self.body_bytes = 0  # of the bodies in `retained`
        self.durable_seq = durable_seq  # the append (or mint) whose commit makes the epoch durable
        self.last_seq = durable_seq  # the topic is idle (may leave memory) once this is committed


class History:
    """In-memory index of retained messages, with an optional durable backend.

    Everything but the BLOCKING calls (`commit`, `fetch`, `load_topics`, `close`, and opening,
    which loads the file) runs on the event loop; those touch only SQLite.
    """

    def __init__(
        self, retention: Retention = DEFAULT_RETENTION, backend: SqliteBackend | None = None
    ) -> None:
        self._retention = retention
        self._max_age_ms = retention.max_age * 1000.0
        self._backend = backend
        self._topics: OrderedDict[str, _Topic] = OrderedDict()  # least recently used first
        self._holding: dict[str, _Topic] = {}  # the topics with messages in memory
        self._heads: list[tuple[int, int, int, str]] = []  # heap of their oldest, lazily updated
        self._bytes = 0  # footprint of every message in memory
        self._complete = True  # every topic on disk is in memory: an unknown one is new
        self._evicted: OrderedDict[str, int] = OrderedDict()  # destination -> eviction count
        self._evictions = 0
        self._forgotten = 0  # the last eviction dropped from `_evicted`
        self._pruned: dict[int, Pruned] = {}  # by batch seq: written by `commit`'s thread
        self._pending: list[Stored] = []
        self._pending_topics: list[tuple[str, str]] = []
        self._seq = 0
        self._committed = 0
        if backend is not None:
            loaded = backend.load(retention, _now_ms())
            self._complete = loaded.complete
            for state in reversed(loaded.topics):  # most recently used last, as in use
                self._install(state)
            self._shrink()

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

    @property
    def memory_bytes(self) -> int:
        """What the messages held in memory cost (`footprint`); at most `memory_bytes` of the
        retention, once a batch's commit is marked."""
        return self._bytes

    @property
    def topics_in_memory(self) -> int:
        return len(self._topics)

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
        return Position(topic.epoch, topic.high, topic.durable_seq)

    def _topic(self, destination: str) -> _Topic:
        """The topic, minted (and its epoch queued for disk) when seen for the first time."""
        topic = self._topics.get(destination)
        if topic is not None:
            self._topics.move_to_end(destination)
            return topic
        if not self._complete:
            raise NotLoaded(destination)
        return self._mint(destination)

    def _mint(self, destination: str) -> _Topic:
        if self._backend is None:
            return self._new_topic(destination, 0)
        self._seq += 1
        topic = self._new_topic(destination, self._seq)
        self._pending_topics.append((destination, topic.epoch))
        return topic

    def _new_topic(self, destination: str, durable_seq: int) -> _Topic:
        topic = self._topics[destination] = _Topic(destination, new_epoch(), 0, 1, durable_seq)
        self._evict_topics()
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
        topic = self._topics.get(destination)
        if topic is None and not self._complete:
            raise NotLoaded(destination)
        self._seq = seq = self._seq + 1
        if topic is None:
            topic = self._new_topic(destination, seq)
        else:
            self._topics.move_to_end(destination)
        topic.last = offset = topic.last + 1
        topic.last_seq = seq
        stored = Stored(
            destination, offset, topic.epoch, timestamp_ms, sender, content_type, body, headers, seq
        )
        self._forget_up_to(topic, offset - self._retention.max_count)  # retention by count
        if self._backend is None:
            self._admit(topic, stored)
            self._shrink()
        else:
            self._pending.append(stored)
        return stored

    def _admit(self, topic: _Topic, stored: Stored) -> None:
        """A committed message: the topic's new high-water mark, retained in memory."""
        topic.high = stored.offset
        retained = topic.retained
        retained.append(stored)
        topic.body_bytes += len(stored.body)
        self._bytes += footprint(stored)
        if len(retained) == 1:
            self._holding[topic.name] = topic
            self._push_head(topic)
        self._forget_up_to(topic, stored.offset - self._retention.max_count)
        while topic.body_bytes > self._retention.max_bytes:  # retention by bytes
            self._retire(topic)
        if retained and retained[0].timestamp_ms < stored.timestamp_ms - self._max_age_ms:
            self._expire(topic, stored.timestamp_ms)

    def _forget_up_to(self, topic: _Topic, gone: int) -> None:
        """Retention dropped every offset up to `gone`."""
        topic.first = max(topic.first, gone + 1)
        retained = topic.retained
        while retained and retained[0].offset <= gone:
            self._drop_oldest(topic)

    def _retire(self, topic: _Topic) -> None:
        """Retention drops the topic's oldest retained message."""
        topic.first = self._drop_oldest(topic).offset + 1

    def _drop_oldest(self, topic: _Topic) -> Stored:
        """The topic's oldest message leaves memory (retention, or the budget)."""
        stored = topic.retained.popleft()
        topic.body_bytes -= len(stored.body)
        self._bytes -= footprint(stored)
        if topic.retained:
            self._push_head(topic)
        else:
            del self._holding[topic.name]
        return stored

    def _expire(self, topic: _Topic, now_ms: int) -> None:
        cutoff = now_ms - self._max_age_ms
        retained = topic.retained
        while retained and retained[0].timestamp_ms < cutoff:
            self._retire(topic)

    def _shrink(self) -> None:
        """The oldest messages leave memory until the rest fit the budget: to disk, or (a
        memory store) out of retention."""
        heads = self._heads
        while self._bytes > self._retention.memory_bytes:
            _, _, offset, name = heapq.heappop(heads)
            topic = self._holding.get(name)
            if topic is None or topic.retained[0].offset != offset:
                continue  # that message already left
            if self._backend is None:
                self._retire(topic)
            else:
                self._drop_oldest(topic)

    def _push_head(self, topic: _Topic) -> None:
        """Index the topic's oldest message in memory by age (seq; at start, timestamp)."""
        head = topic.retained[0]
        heapq.heappush(self._heads, (head.seq, head.timestamp_ms, head.offset, topic.name))
        if len(self._heads) > 2 * len(self._holding) + HEADS_SLACK:  # drop entries that left
            self._heads = [
                (t.retained[0].seq, t.retained[0].timestamp_ms, t.retained[0].offset, t.name)
                for t in self._holding.values()
            ]
            heapq.heapify(self._heads)

    def _evict_topics(self) -> None:
        """The least recently used idle topics leave memory while there are too many."""
        excess = len(self._topics) - self._retention.max_topics
        if excess <= 0:
            return
        committed = self.committed_seq
        idle = [t for t in islice(self._topics.values(), excess + 64) if t.last_seq <= committed]
        for topic in idle[:excess]:
            self._evict(topic)

    def _evict(self, topic: _Topic) -> None:
        while topic.retained:
            self._drop_oldest(topic)
        del self._topics[topic.name]
        if self._backend is None:
            return  # no disk: its history is lost, its next use mints a new epoch
        self._complete = False
        self._evictions += 1
        self._evicted[topic.name] = self._evictions
        self._evicted.move_to_end(topic.name)
        if len(self._evicted) > EVICTIONS_REMEMBERED:
            self._forgotten = self._evicted.popitem(last=False)[1]

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

        Raises `HistoryGap` if any of them is no longer retained, `OnDisk` if the next one is
        on disk only. Consume the iterator before the next append (it walks the retained deque).
        """
        topic = self._topic(destination)
        first, last = self._window(topic, now_ms)
        if epoch != topic.epoch or (after < last and first > after + 1):
            raise HistoryGap(f"{destination}: messages after {after} of epoch {epoch} are gone")
        retained = topic.retained
        start = retained[0].offset if retained else last + 1
        if after + 1 < start and after < last:
            raise OnDisk(DiskRead(destination, epoch, after, start - 1))
        return islice(retained, max(after + 1 - start, 0), None)

    def fetch(self, page: DiskRead, max_bytes: int) -> list[Stored]:
        """BLOCKING: the messages of `page` from disk, oldest first, about `max_bytes` of
        bodies (at least one); run it in the committer's worker thread (its Lane).

        Raises `HistoryGap` if retention dropped the first of them meanwhile.
        """
        messages = []
        if self._backend is not None:
            messages = self._backend.read_range(page.destination, page.after, page.until, max_bytes)
        if not messages or messages[0].epoch != page.epoch:
            raise HistoryGap(f"{page.destination}: offset {page.after + 1} is no longer retained")
        return messages

    def _window(self, topic: _Topic, now_ms: int) -> tuple[int, int]:
        """(first retained offset, last committed offset); retained offsets are contiguous."""
        self._expire(topic, now_ms)
        return topic.first, topic.high

    def missing(self, *destinations: str) -> TopicLoad | None:
        """Which of `destinations` must be read back from disk before use (None: none).

        Read them with `load_topics` (off the event loop), then `install` them, then ask
        again: use them in the same synchronous step as the answer None.
        """
        if self._complete:
            return None
        absent = tuple(d for d in dict.fromkeys(destinations) if d not in self._topics)
        return TopicLoad(absent, self._evictions) if absent else None

    def load_topics(self, load: TopicLoad) -> list[TopicState]:
        """BLOCKING: the topics of `load` that are on disk; run it in the history's Lane."""
        return [] if self._backend is None else self._backend.read_topics(load.destinations)

    def install(self, load: TopicLoad, states: list[TopicState]) -> None:
        """Put the topics `load_topics` read into memory; a topic not on disk is minted.

        A topic evicted since `missing` was asked (it may have changed) stays out.
        """
        found = {state.destination: state for state in states}
        for destination in load.destinations:
            if destination in self._topics or self._evicted_since(destination, load.ticket):
                continue
            state = found.get(destination)
            if state is None:
                self._mint(destination)
            else:
                self._install(state)
                self._evict_topics()

    def _evicted_since(self, destination: str, ticket: int) -> bool:
        return ticket < self._forgotten or self._evicted.get(destination, 0) > ticket

    def _install(self, state: TopicState) -> None:
        name = state.destination
        topic = _Topic(name, state.epoch, state.last_offset, state.first_offset, 0)
        self._topics[name] = topic
        for stored in state.messages:
            self._admit(topic, stored)

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
            self._pruned[batch.seq] = self._backend.write(batch, self._retention)

    def mark_committed(self, batch: Batch) -> None:
        """Record that `batch` (taken in order by `take_pending`) is on disk: its messages
        become visible, and what retention dropped from the file leaves memory too."""
        if not batch:
            return
        self._committed = max(self._committed, batch.seq)
        for stored in batch.messages:  # their topics were not idle: still in memory
            self._admit(self._topics[stored.destination], stored)
        for destination, gone in self._pruned.pop(batch.seq, {}).items():
            if (topic := self._topics.get(destination)) is not None:
                self._forget_up_to(topic, gone)
        self._shrink()
        self._evict_topics()

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
