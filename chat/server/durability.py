"""Group commit of published messages, and RECEIPTs held until what they cover is on disk.

How this works: `History.append` assigns offsets in memory and queues the record (so does
`History.position` for the epoch of a topic it mints, so a quiet room's epoch survives). One
committer task takes everything pending, writes it in a single SQLite transaction on a
worker thread (the history's `Lane`), and marks it committed; whatever was appended
meanwhile forms the next batch, so the fsync cost is shared by every message of a batch
(PROTOCOL.md §8: a RECEIPT for a SEND means the message survives a crash). Receipts wait in a
heap keyed by the append sequence they need; a session never lets a later receipt overtake an
earlier one.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable

import trio

from chat.history import History
from chat.server.storage import Lane, StorageUnavailable
from chat.store.history import Batch

log = logging.getLogger("chat.server")

RETRY_DELAY = 1.0  # after a failed commit (disk full, I/O error), try the same batch again


class Durability:
    """Drives the history's commits and releases receipts once their sequence is durable."""

    def __init__(self, history: History, lane: Lane) -> None:
        self.history = history
        self._lane = lane
        self._waiting: list[tuple[int, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._appended = trio.Event()

    def appended(self) -> None:
        """A message was appended: the committer has work."""
        self._appended.set()

    def after(self, seq: int, deliver: Callable[[], None]) -> None:
        """Call `deliver` once every append up to `seq` is durable (at once if it already is)."""
        if seq <= self.history.committed_seq:
            deliver()
        else:
            heapq.heappush(self._waiting, (seq, next(self._order), deliver))

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
                log.error("history commit failed (%s); receipts wait, retrying", exc.detail)
                await trio.sleep(RETRY_DELAY)
                continue
            self.history.mark_committed(batch)
            self._release()
            return

    def _release(self) -> None:
        committed = self.history.committed_seq
        while self._waiting and self._waiting[0][0] <= committed:
            heapq.heappop(self._waiting)[2]()
