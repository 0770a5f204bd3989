"""How the running server calls storage: never on the event loop (DESIGN.md "Storage").

How this works: every blocking call into `chat.store` (SQLite, flock, key generation, key
files) runs in a trio worker thread through a `Lane`; the server has one lane per store (the
state database, the key directory, the history database). A lane runs its calls one at a
time, in the order they were asked for (`trio.to_thread.run_sync` with a `CapacityLimiter`
of one).

Why a lane per store, not one storage thread: the stores block for unrelated reasons (another
process's transaction on state.db, an operator's flock on keys/, an fsync of history.db), and
none may wait for another: a token request stuck behind `chat-server revoke` must not hold up
the group commit that releases RECEIPTs, nor the key reload, nor the revocation poll once its
turn comes. Why one call at a time: each store has one SQLite connection (or one flock) and
would serialize its callers anyway; a caller queued in trio holds no thread, so a burst of
token requests against a locked database cannot use up trio's shared pool of threads.

What the event loop reads instead is in memory: the revocation snapshot
(`StateStore.revocations`, refreshed by the server's poll), the signing keys (`KeyStore`
swaps a frozen key set), and the retained messages (`History`). A caller cancelled while its
call runs waits for the call to finish (at most the busy timeout): a store is never closed,
nor its lock released, under a running call.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import ClassVar, TypeVar, TypeVarTuple

import trio

from chat.protocol.errors import HttpRefusal

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
RETRY_AFTER_S = 1  # a store busy past its timeout is usually free again within a second


class StorageUnavailable(HttpRefusal):
    """A store failed or stayed locked past its busy timeout: answered 503, never a traceback.

    The server's own loops (revocation poll, pruning, group commit) log it and try again.
    """

    status: ClassVar[int] = 503
    code: ClassVar[str] = "storage_unavailable"

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(RETRY_AFTER_S))]


class Lane:
    """One store's blocking calls, run in worker threads one at a time, in order."""

    def __init__(self) -> None:
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, call: Callable[[*Ts], T], *args: *Ts) -> T:
        """`call(*args)` in a worker thread, once the lane's earlier calls have finished.

        Storage failures (SQLite errors, a lock held past the busy timeout, I/O errors) are
        translated here, once, into `StorageUnavailable`.
        """
        try:
            return await self.run_blocking(call, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(
                f"the server's storage is busy or failing ({exc}); try again shortly"
            ) from exc

    async def run_blocking(self, call: Callable[[*Ts], T], *args: *Ts) -> T:
        """Where a call runs, errors untranslated: a worker thread, one call at a time.

        A subclass may run calls elsewhere (on the event loop, for a test on trio's
        `MockClock`, whose autojump would race ahead while a worker thread runs).
        """
        return await trio.to_thread.run_sync(call, *args, limiter=self._limiter)

    async def run_shielded(self, call: Callable[[*Ts], T], *args: *Ts) -> T:
        """Like `run`, even in a cancelled scope: for closing a store on the way out."""
        with trio.CancelScope(shield=True):
            result = await self.run(call, *args)
        return result
