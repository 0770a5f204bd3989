"""Storage never stalls the event loop (DESIGN.md "Storage", chat/server/storage.py).

While another process holds the state database's write lock (an operator's `chat-server
revoke`) or the key directory's flock (`chat-server keys rotate`), only the calls that need
that store wait, in a worker thread; live connections keep exchanging messages and
heart-beats, and the waiting call completes once the lock is released.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from chat.protocol.stomp import SERVER_COMMANDS, Frame, FrameParser
from tests.conftest import (
    HttpReply,
    RunningServer,
    StartServer,
    StompPeer,
    TestPki,
    http_request,
    raw_ws,
    stomp_peer,
    token_for,
)

HEARTBEAT_MS = 50  # the server's heart-beats to the subscriber: several per lock held
BEATS = 3  # heart-beats the subscriber must receive while the lock is held
ROOM = "/topic/storage"
WAIT = 5  # bound on each wait on the peer, as StompPeer.receive has


class Calls:
    """Observe one method of a live store: `entered` is set when a call starts, `finished`
    when it returns. Both are set through `trio.from_thread`, which refuses to run on the
    event loop itself: a call made there fails instead of passing the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: object, method: str) -> None:
        self.entered = trio.Event()
        self.finished = trio.Event()
        real = getattr(store, method)

        def observed(*args: object) -> object:
            trio.from_thread.run_sync(self.entered.set)
            result = real(*args)
            trio.from_thread.run_sync(self.finished.set)
            return result

        monkeypatch.setattr(store, method, observed)


@contextmanager
def write_locked(database: Path) -> Iterator[Callable[[], None]]:
    """Hold the database's write lock, as another process's open transaction does."""
    other = sqlite3.connect(database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield lambda: other.execute("ROLLBACK")
    finally:
        other.close()


@contextmanager
def flock_held(path: Path) -> Iterator[Callable[[], None]]:
    """Hold an exclusive flock, as `chat-server keys rotate` does while it writes a key."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield lambda: fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def subscribed(peer: StompPeer) -> None:
    await peer.send("SUBSCRIBE", {"destination": ROOM, "id": "s", "receipt": "subscribed"})
    assert (await peer.receive()).get("receipt-id") == "subscribed"


async def beats_and_frames(peer: StompPeer, beats: int, frames: int) -> list[Frame]:
    """Read until `beats` heart-beats and `frames` frames have arrived; the frames."""
    parser = FrameParser(commands=SERVER_COMMANDS)
    received: list[Frame] = []
    with trio.fail_after(WAIT):
        while beats > 0 or len(received) < frames:
            message = await peer.ws.get_message()
            if message == "\n":
                beats -= 1
            else:
                received.extend(
                    parser.feed(message.encode() if isinstance(message, str) else message)
                )
    return received


async def traffic_flows(alice: StompPeer, bob: StompPeer, body: bytes) -> None:
    """alice's SEND is receipted and reaches subscriber bob, between heart-beats to bob."""
    await alice.send("SEND", {"destination": ROOM, "receipt": "sent"}, body)
    assert (await alice.receive()).get("receipt-id") == "sent"
    (message,) = await beats_and_frames(bob, BEATS, 1)
    assert (message.command, message.body) == ("MESSAGE", body)


async def idle(lane_owner: RunningServer, lane: str) -> None:
    """Wait until what the server queued on a store's lane so far (the startup prune) ran."""
    await getattr(lane_owner.server, lane).run(lambda: None)


async def test_a_token_request_waits_for_a_locked_state_database_while_traffic_flows(
    start_server: StartServer, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(heartbeat=(HEARTBEAT_MS, HEARTBEAT_MS))
    async with (
        stomp_peer(server, pki, "bob", heartbeat=f"0,{HEARTBEAT_MS}") as bob,
        stomp_peer(server, pki, "alice") as alice,
    ):
        await subscribed(bob)
        await idle(server, "state_lane")
        issue = Calls(monkeypatch, server.server.state, "issue_refresh")
        replies: list[HttpReply] = []

        async def ask_for_a_token() -> None:
            context = pki.client_context("carol")
            replies.append(await http_request(server, context, "POST", "/auth/token"))

        with write_locked(server.config.state_dir / "state.db") as release:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_for_a_token)
                with trio.fail_after(WAIT):
                    await issue.entered.wait()  # in a worker thread, waiting for the lock
                await traffic_flows(alice, bob, b"the database is locked")
                assert not issue.finished.is_set() and not replies
                release()
        assert replies[0].status == 200
        assert replies[0].json()["refresh_token"]


async def test_a_key_reload_waits_for_the_key_lock_while_tokens_and_traffic_flow(
    start_server: StartServer, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(heartbeat=(HEARTBEAT_MS, HEARTBEAT_MS), revocation_poll=0.05)
    keys = server.config.state_dir / "keys"
    async with (
        stomp_peer(server, pki, "bob", heartbeat=f"0,{HEARTBEAT_MS}") as bob,
        stomp_peer(server, pki, "alice") as alice,
    ):
        await subscribed(bob)
        await idle(server, "keys_lane")
        reload = Calls(monkeypatch, server.server.keys, "reload")
        with flock_held(keys / ".lock") as release:
            changed = keys.stat().st_mtime_ns + 1_000_000  # another process changed the keys
            os.utime(keys, ns=(changed, changed))
            with trio.fail_after(WAIT):
                await reload.entered.wait()  # the poll's reload waits for the lock, off the loop
            await traffic_flows(alice, bob, b"the key directory is locked")
            token = await token_for(server, pki, "carol")  # signed with the keys in memory
            async with raw_ws(server, pki, "carol", token=token) as ws:
                assert ws.subprotocol == "v12.stomp"
            jwks = await http_request(
                server, pki.client_context("carol"), "GET", "/.well-known/jwks.json"
            )
            assert jwks.status == 200 and jwks.json()["keys"]
            assert not reload.finished.is_set()
            release()
            with trio.fail_after(WAIT):
                await reload.finished.wait()


async def test_a_failing_state_database_answers_503_and_the_server_goes_on(
    start_server: StartServer, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that fails (here: its tables dropped by someone else) is a 503 with its code,
    never a traceback; the revocation poll logs and keeps polling; traffic is untouched."""
    server = await start_server(heartbeat=(HEARTBEAT_MS, HEARTBEAT_MS), revocation_poll=0.05)
    async with (
        stomp_peer(server, pki, "bob", heartbeat=f"0,{HEARTBEAT_MS}") as bob,
        stomp_peer(server, pki, "alice") as alice,
    ):
        await subscribed(bob)
        await idle(server, "state_lane")
        other = sqlite3.connect(server.config.state_dir / "state.db", isolation_level=None)
        try:
            other.executescript("DROP TABLE refresh_tokens; DROP TABLE counters;")
        finally:
            other.close()
        reply = await http_request(server, pki.client_context("carol"), "POST", "/auth/token")
        assert reply.status == 503
        assert reply.json()["error"] == "storage_unavailable"
        assert reply.headers.get("retry-after") == "1"
        for _ in range(2):  # the poll fails on the missing table, and comes back to it
            poll = Calls(monkeypatch, server.server.state, "load_revocations")
            with trio.fail_after(WAIT):
                await poll.entered.wait()
        await traffic_flows(alice, bob, b"still here")
