"""Group commit of published messages, and RECEIPTs held until what they cover is on disk.

How this works: `History.append` assigns offsets in memory and queues the record (so does
`History.position` for the epoch of a topic it mints, so a quiet room's epoch survives). One
committer task takes everything pending, writes it in a single SQLite transaction on a
worker thread (the history's `Lane`), and marks it committed; whatever was appended
meanwhile forms the next batch, so the fsync cost is shared by every message of a batch
(PROTOCOL.md §8: a RECEIPT for a SEND means the message survives a crash). Receipts wait in a
heap keyed by the append sequence they need; a session never lets a later receipt overtake an
earlier one.

The history keeps only part of itself in memory (`--history-memory-bytes`, `--max-topics`);
the rest is read back on the same lane, never on the event loop: `loaded()` brings topics back
before a frame that uses them is handled, and `read_later()` fetches the next page of a replay
whose messages are on disk only, handing it to a callback on the event loop.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable

import trio

from chat.history import DiskRead, History, HistoryGap
from chat.server.storage import Lane, StorageUnavailable
from chat.store.history import Batch, Stored

log = logging.getLogger("chat.server")

RETRY_DELAY = 1.0  # after a failed commit (disk full, I/O error), try the same batch again
PAGE_BYTES = 256 * 1024  # message bodies per page a replay reads from disk
PageRead = Callable[[list[Stored] | HistoryGap], None]  # a page, or why it is gone
Loaded = Callable[[StorageUnavailable | None], None]  # topics back in memory, or the failure
Job = Callable[[], Awaitable[None]]


class Durability:
    """Drives the history's commits and releases receipts once their sequence is durable."""

    def __init__(self, history: History, lane: Lane) -> None:
        self.history = history
        self._lane = lane
        self._waiting: list[tuple[int, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._appended = trio.Event()
        # At most one job per replay in progress, and replays are bounded by subscriptions.
        self._later_in, self._later = trio.open_memory_channel[Job](float("inf"))
        # Why the last commit failed, until one succeeds: /healthz reports the history unwritable.
        self.commit_failure: str | None = None

    def appended(self) -> None:
        """A message was appended: the committer has work."""
        self._appended.set()

    def after(self, seq: int, deliver: Callable[[], None]) -> None:
        """Call `deliver` once every append up to `seq` is durable (at once if it already is)."""
        if seq <= self.history.committed_seq:
            deliver()
        else:
            heapq.heappush(self._waiting, (seq, next(self._order), deliver))

    async def loaded(self, destinations: tuple[str, ...]) -> None:
        """Bring the topics of `destinations` into memory (read back from disk if evicted);
        use them before the next checkpoint. Raises StorageUnavailable."""
        while (load := self.history.missing(*destinations)) is not None:
            self.history.install(load, await self._lane.run(self.history.load_topics, load))

    def read_later(self, page: DiskRead, done: PageRead) -> None:
        """Fetch `page` off the event loop, then call `done` with it (on the loop)."""
        self._later_in.send_nowait(functools.partial(self._read, page, done))

    def load_later(self, destinations: tuple[str, ...], done: Loaded) -> None:
        """`loaded(destinations)` for a caller that cannot await: then `done(None)`, or
        `done(the failure)`."""
        self._later_in.send_nowait(functools.partial(self._load, destinations, done))

    async def run_later(self) -> None:
        """What `read_later` and `load_later` asked for, one at a time, until cancelled."""
        async for job in self._later:
            await job()

    async def _read(self, page: DiskRead, done: PageRead) -> None:
        while True:
            try:
                messages = await self._lane.run(self.history.fetch, page, PAGE_BYTES)
            except HistoryGap as gap:
                done(gap)
            except StorageUnavailable as exc:
                log.error(
                    "history read failed (%s); a replay waits, retrying",
                    exc.detail,
                    extra={"event": "history_read_failed", "error": exc.detail},
                )
                await trio.sleep(RETRY_DELAY)
                continue
            else:
                done(messages)
            return

    async def _load(self, destinations: tuple[str, ...], done: Loaded) -> None:
        try:
            await self.loaded(destinations)
        except StorageUnavailable as exc:
            done(exc)
        else:
            done(None)

    async def run(self) -> None:
        """The committer: one transaction per batch, until cancelled."""
        while True:
            await self._appended.wait()
            self._appended = trio.Event()
            batch = self.history.take_pending()
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: Batch) -> None:
        while True:
            try:
                await self._lane.run(self.history.commit, batch)
            except StorageUnavailable as exc:
                self.commit_failure = exc.detail
                log.error(
                    "history commit failed (%s); receipts wait, retrying",
                    exc.detail,
                    extra={"event": "history_commit_failed", "error": exc.detail},
                )
                await trio.sleep(RETRY_DELAY)
                continue
            self.commit_failure = None
            self.history.mark_committed(batch)
            self._release()
            return

    def _release(self) -> None:
        committed = self.history.committed_seq
        while self._waiting and self._waiting[0][0] <= committed:
            heapq.heappop(self._waiting)[2]()
