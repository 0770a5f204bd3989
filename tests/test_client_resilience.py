"""The resilient session: reconnect with backoff, resubscribe, resume exactly once.

Against the real server for restarts (stop one ChatServer, start another on the same port
and state directory), and against a scripted fake server (from test_client_library) for
what the real one cannot be made to do on cue: replay a duplicate, lose its history, go
silent, drop a SEND without its RECEIPT. Tokens for the fake's sessions come from a real
server: the fake does not check them.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

from chat.client.auth import TokenSource
from chat.client.backoff import Backoff
from chat.client.connection import Message
from chat.client.errors import ServerBusy, TokenRefused
from chat.client.resilient import (
    Event,
    NotDelivered,
    Online,
    Reconnecting,
    Recovered,
    Resilience,
    ResilientSession,
    connect_resilient,
)
from chat.protocol.stomp import Frame, FrameParser
from chat.server.app import ChatServer
from chat.server.config import ServerConfig
from tests.conftest import RunningServer, StartServer, TestPki
from tests.test_client_library import (
    answer_receipts,
    chat_as,
    connected,
    read_frame,
    start_fake,
    wire,
)

FAST = 5  # seconds: every wait here is on loopback
QUICK = Resilience(backoff=Backoff(base=0.05, cap=0.2), send_timeout=FAST)
LOBBY = "/topic/lobby"


# ---------------------------------------------------------------- backoff: pure


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    backoff = Backoff(base=0.2, cap=10.0)
    assert [backoff.ceiling(n) for n in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    rng = random.Random(7)
    for attempt in range(12):
        delays = [backoff.delay(attempt, rng.uniform) for _ in range(200)]
        assert all(0.0 <= d <= backoff.ceiling(attempt) for d in delays)
        assert min(delays) < 0.1 * backoff.ceiling(attempt)  # full jitter: down to ~0
        assert max(delays) > 0.9 * backoff.ceiling(attempt)  # and up to the ceiling


def test_backoff_cap_holds_for_any_attempt() -> None:
    backoff = Backoff(base=0.05, cap=3.0)
    top = lambda low, high: high  # noqa: E731 - the largest value uniform() could return
    assert backoff.delay(0, top) == 0.05
    assert backoff.delay(5, top) == 1.6
    assert backoff.delay(6, top) == 3.0
    assert backoff.delay(10_000, top) == 3.0  # no overflow however long the outage
    with pytest.raises(ValueError):
        Backoff(base=0.0)
    with pytest.raises(ValueError):
        Backoff(base=2.0, cap=1.0)


# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def resilient_as(
    ws_url: str,
    tokens_from: RunningServer,
    pki: TestPki,
    name: str = "bob",
    heartbeat: tuple[int, int] = (0, 0),
    resilience: Resilience = QUICK,
) -> AsyncIterator[ResilientSession]:
    tokens = TokenSource(tokens_from.base_url, pki.client_context(name))
    async with connect_resilient(
        ws_url, pki.client_context(name), tokens, heartbeat=heartbeat, resilience=resilience
    ) as session:
        yield session


async def events_until(session: ResilientSession, texts: int) -> list[Event]:
    """Every event until `texts` messages have come."""
    events: list[Event] = []
    with trio.fail_after(FAST):
        while sum(isinstance(e, Message) for e in events) < texts:
            events.append(await session.receive())
    return events


def texts(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, Message)]


def stored(n: int, subscription: str, epoch: str = "e1") -> Frame:
    """A MESSAGE as a server with history sends it (PROTOCOL.md §8)."""
    return Frame(
        "MESSAGE",
        (
            ("destination", LOBBY),
            ("subscription", subscription),
            ("message-id", str(n)),
            ("sender", "alice"),
            ("timestamp", "1700000000000"),
            ("offset", str(n)),
            ("epoch", epoch),
            ("content-length", str(len(f"m{n}"))),
        ),
        f"m{n}".encode(),
    )


def receipt(frame: Frame, *extra: tuple[str, str]) -> Frame:
    return Frame("RECEIPT", (("receipt-id", frame.require("receipt")), *extra))


async def connect_and_subscribe(
    ws: WebSocketConnection, parser: FrameParser, heartbeat: str = "0,0"
) -> Frame:
    await read_frame(ws, parser)  # CONNECT
    await ws.send_message(wire(connected(heartbeat)))
    return await read_frame(ws, parser)


class Servers:
    """One server at a time on one port and one state directory: stop it, start it again."""

    def __init__(self, nursery: trio.Nursery, config: ServerConfig) -> None:
        self._nursery = nursery
        self._config = config
        self.port: int | None = None  # the home port, from the first start
        self._current: tuple[ChatServer, trio.Event] | None = None

    async def start(self, *, elsewhere: bool = False) -> RunningServer:
        """Start on the home port (or, `elsewhere`, on a new one); returns once listening."""
        port = 0 if elsewhere or self.port is None else self.port
        server = ChatServer(replace(self._config, port=port))
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[int]) -> None:
            try:
                await server.run(task_status=task_status)
            finally:
                done.set()

        actual = await self._nursery.start(run)
        self.port = self.port or actual
        self._current = (server, done)
        return RunningServer(server, actual)

    async def stop(self) -> None:
        """Shut down (1001 to every client) and wait until the state is closed."""
        assert self._current is not None
        server, done = self._current
        server.shutdown()
        with trio.fail_after(FAST):
            await done.wait()


def restartable(nursery: trio.Nursery, pki: TestPki, tmp_path: Path) -> Servers:
    config = ServerConfig(host="127.0.0.1", port=0, certs_dir=pki.dir, state_dir=tmp_path / "state")
    return Servers(nursery, config)


@pytest.fixture
def servers(nursery: trio.Nursery, pki: TestPki, tmp_path: Path) -> Servers:
    return restartable(nursery, pki, tmp_path)


async def until(session: ResilientSession, kind: type) -> list[Event]:
    """Every event up to the first of `kind`."""
    events: list[Event] = []
    with trio.fail_after(FAST):
        while not any(isinstance(e, kind) for e in events):
            events.append(await session.receive())
    return events


# ---------------------------------------------------------------- against the fake server


async def test_resume_skips_duplicates_and_reports_recovery(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    subscribes: list[Frame] = []
    connection = itertools.count()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        first = next(connection) == 0
        subscribe = await connect_and_subscribe(ws, parser)
        subscribes.append(subscribe)
        sid = subscribe.require("id")
        if first:
            await ws.send_message(wire(receipt(subscribe), stored(1, sid), stored(2, sid)))
            await ws.aclose(1001)
            return
        # the replay overlaps what was delivered (2), then the RECEIPT, then live traffic
        await ws.send_message(
            wire(
                stored(2, sid),
                stored(3, sid),
                receipt(subscribe, ("recovered", "true")),
                stored(4, sid),
            )
        )
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki) as bob:
        await bob.subscribe(LOBBY)
        events = await events_until(bob, 4)
    assert texts(events) == ["m1", "m2", "m3", "m4"]
    assert events[0] == Online(events[0].session, first=True)
    reconnecting = next(e for e in events if isinstance(e, Reconnecting))
    assert reconnecting.attempt == 1 and 0 <= reconnecting.delay <= 0.05
    assert "1001" in reconnecting.reason and "shutting down" in reconnecting.reason
    assert any(isinstance(e, Online) and not e.first for e in events)
    assert Recovered(LOBBY, True) in events
    assert subscribes[0].get("since-offset") is None
    assert (subscribes[1].get("since-offset"), subscribes[1].get("epoch")) == ("2", "e1")


async def test_lost_history_is_reported_and_its_new_epoch_delivered(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    connection = itertools.count()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        first = next(connection) == 0
        subscribe = await connect_and_subscribe(ws, parser)
        sid = subscribe.require("id")
        if first:
            await ws.send_message(wire(receipt(subscribe), stored(1, sid), stored(2, sid)))
            await ws.aclose(1001)
            return
        # a new epoch: the server lost its history; offsets 1 and 2 are different messages
        await ws.send_message(
            wire(
                stored(1, sid, "e2"),
                stored(2, sid, "e2"),
                receipt(subscribe, ("recovered", "false")),
            )
        )
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki) as bob:
        await bob.subscribe(LOBBY)
        events = await events_until(bob, 4)
        with trio.fail_after(FAST):
            while Recovered(LOBBY, False) not in events:
                events.append(await bob.receive())
    assert texts(events) == ["m1", "m2", "m1", "m2"]


async def test_quiet_room_resumes_from_its_subscribe_receipt(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    """No message was ever seen in the room: the SUBSCRIBE's RECEIPT (epoch, offset) is the
    position to resume from, so what was sent while away is replayed (PROTOCOL.md §8)."""
    subscribes: list[Frame] = []
    connection = itertools.count()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        first = next(connection) == 0
        subscribe = await connect_and_subscribe(ws, parser)
        subscribes.append(subscribe)
        if first:
            await ws.send_message(wire(receipt(subscribe, ("epoch", "e1"), ("offset", "0"))))
            await ws.aclose(1001)
            return
        await ws.send_message(
            wire(
                stored(1, subscribe.require("id")),
                receipt(subscribe, ("recovered", "true"), ("epoch", "e1"), ("offset", "1")),
            )
        )
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki) as bob:
        await bob.subscribe(LOBBY)
        events = await events_until(bob, 1)
    assert texts(events) == ["m1"]
    assert Recovered(LOBBY, True) in events
    assert (subscribes[1].get("since-offset"), subscribes[1].get("epoch")) == ("0", "e1")


async def test_quiet_room_with_a_new_epoch_resumes_from_the_new_one(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    """History lost while the room was quiet: warned once; the next resume starts at the
    new epoch's beginning instead of warning again (and nothing of it is skipped)."""
    subscribes: list[Frame] = []
    connection = itertools.count()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        n = next(connection)
        subscribe = await connect_and_subscribe(ws, parser)
        subscribes.append(subscribe)
        if n < 2:
            answer = (
                (("epoch", "e1"), ("offset", "0"))
                if n == 0
                else (("recovered", "false"), ("epoch", "e2"), ("offset", "0"))
            )
            await ws.send_message(wire(receipt(subscribe, *answer)))
            await ws.aclose(1001)
            return
        await ws.send_message(
            wire(
                stored(1, subscribe.require("id"), "e2"),
                receipt(subscribe, ("recovered", "true"), ("epoch", "e2"), ("offset", "1")),
            )
        )
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki) as bob:
        await bob.subscribe(LOBBY)
        events = await events_until(bob, 1)
    assert texts(events) == ["m1"]
    recovered = [e for e in events if isinstance(e, Recovered)]
    assert recovered == [Recovered(LOBBY, False), Recovered(LOBBY, True)]
    resumed = [(f.get("since-offset"), f.get("epoch")) for f in subscribes]
    assert resumed == [(None, None), ("0", "e1"), ("0", "e2")]


async def test_history_on_join_is_marked_even_before_its_receipt(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    """`last:N` messages precede the RECEIPT on the wire; the session holds the room's
    messages until the RECEIPT says where history ends, then marks them."""
    asked: list[Frame] = []

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        subscribe = await connect_and_subscribe(ws, parser)
        asked.append(subscribe)
        sid = subscribe.require("id")
        await ws.send_message(wire(stored(4, sid), stored(5, sid)))
        await ws.send_message(
            wire(receipt(subscribe, ("epoch", "e1"), ("offset", "5")), stored(6, sid))
        )
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki) as bob:
        await bob.subscribe(LOBBY, last=2)
        events = await events_until(bob, 3)
    shown = [(e.text, e.history) for e in events if isinstance(e, Message)]
    assert shown == [("m4", True), ("m5", True), ("m6", False)]
    assert asked[0].get("last") == "2"


async def test_silent_server_is_left_and_reconnected(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    """Heart-beats agreed at 100 ms: a server silent for 200 ms is dead; a new link follows."""
    connection = itertools.count()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        first = next(connection) == 0
        subscribe = await connect_and_subscribe(ws, parser, heartbeat="100,100")
        await ws.send_message(wire(receipt(subscribe)))
        if first:
            while True:  # read our heart-beats, never answer
                await ws.get_message()
        await ws.send_message(wire(stored(1, subscribe.require("id"))))
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki, heartbeat=(100, 100)) as bob:
        await bob.subscribe(LOBBY)
        events = await events_until(bob, 1)
    reconnecting = [e for e in events if isinstance(e, Reconnecting)]
    assert len(reconnecting) == 1 and "went silent" in reconnecting[0].reason
    assert texts(events) == ["m1"]


async def test_error_frame_ends_the_link_not_the_session(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    connection = itertools.count()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        first = next(connection) == 0
        subscribe = await connect_and_subscribe(ws, parser)
        await ws.send_message(wire(receipt(subscribe)))
        if first:
            await ws.send_message(wire(Frame("ERROR", (("message", "slow consumer"),))))
            await ws.aclose(1008)
            return
        await ws.send_message(wire(stored(1, subscribe.require("id"))))
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki) as bob:
        await bob.subscribe(LOBBY)
        events = await events_until(bob, 1)
    reason = next(e for e in events if isinstance(e, Reconnecting)).reason
    assert "slow consumer" in reason


async def test_send_cut_off_before_its_receipt_is_not_resent(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki
) -> None:
    later: list[Frame] = []
    connection = itertools.count()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        first = next(connection) == 0
        await read_frame(ws, parser)
        await ws.send_message(wire(connected()))
        if first:
            send = await read_frame(ws, parser)
            assert send.command == "SEND" and send.get("receipt")
            await ws.aclose(1011)  # gone before the RECEIPT: was it stored? nobody knows
            return
        while True:
            frame = await read_frame(ws, parser)
            later.append(frame)
            if frame.get("receipt"):
                await ws.send_message(wire(receipt(frame)))
            if frame.command == "DISCONNECT":
                return

    url = await start_fake(nursery, pki, script)
    async with resilient_as(url, server, pki) as bob:
        with pytest.raises(NotDelivered) as failed:
            await bob.send(LOBBY, "first")
        assert failed.value.maybe_delivered
        assert "1011" in str(failed.value) and "not resent" in str(failed.value)
        await bob.send(LOBBY, "second")  # waits for the new link, then is receipted
    assert [f.body for f in later if f.command == "SEND"] == [b"second"]


# ---------------------------------------------------------------- against the real server


async def test_server_restart_is_survived(servers: Servers, pki: TestPki) -> None:
    """Stop the server under a session, start another on the same port and state: the
    session comes back by itself and keeps working, both ways."""
    first = await servers.start()
    async with resilient_as(first.ws_url, first, pki) as bob:
        await bob.subscribe(LOBBY)
        async with chat_as(first, pki, "alice") as alice:
            await alice.send(LOBBY, "before")
            assert texts(await events_until(bob, 1)) == ["before"]
        await servers.stop()
        assert "shutting down" in (await until(bob, Reconnecting))[-1].reason
        second = await servers.start()
        await until(bob, Online)
        await bob.send(LOBBY, "bob is back")
        async with chat_as(second, pki, "alice") as alice:
            await alice.send(LOBBY, "after")
        assert texts(await events_until(bob, 2)) == ["bob is back", "after"]


async def test_restart_loses_and_duplicates_nothing(servers: Servers, pki: TestPki) -> None:
    """What is published while the session is away is replayed on reconnect, once, in order
    (PROTOCOL.md §8). The session is kept away by publishing through a second server on
    another port (same state) while it knocks at the first one's."""
    first = await servers.start()
    async with resilient_as(first.ws_url, first, pki) as bob:
        await bob.subscribe(LOBBY)
        async with chat_as(first, pki, "alice") as alice:
            await alice.send(LOBBY, "m1")
        events = await events_until(bob, 1)
        await servers.stop()
        aside = await servers.start(elsewhere=True)
        async with chat_as(aside, pki, "alice") as alice:
            await alice.send(LOBBY, "m2")  # receipted: stored
            await alice.send(LOBBY, "m3")
        await servers.stop()
        second = await servers.start()
        events += await events_until(bob, 2)
        async with chat_as(second, pki, "alice") as alice:
            await alice.send(LOBBY, "m4")
        events += await events_until(bob, 1)
    assert texts(events) == ["m1", "m2", "m3", "m4"]
    offsets = [e.position.offset for e in events if isinstance(e, Message) and e.position]
    assert offsets == [1, 2, 3, 4]
    assert Recovered(LOBBY, True) in events


async def test_quiet_room_loses_nothing_across_a_restart(servers: Servers, pki: TestPki) -> None:
    """The issue's reproduction: alice and bob join a room nobody wrote in yet; the server
    restarts; carol writes at once. Both see it exactly once, and recovered."""
    quiet = "/topic/quiet2"
    first = await servers.start()
    async with (
        resilient_as(first.ws_url, first, pki, "alice") as alice,
        resilient_as(first.ws_url, first, pki, "bob") as bob,
    ):
        for session in (alice, bob):
            await session.subscribe(quiet)
        await servers.stop()
        second = await servers.start()
        async with chat_as(second, pki, "carol") as carol:
            await carol.send(quiet, "x")
        seen = {name: await events_until(s, 1) for name, s in (("alice", alice), ("bob", bob))}
        async with chat_as(second, pki, "carol") as carol:
            await carol.send(quiet, "y")  # after it: nothing else arrives between
        for name, session in (("alice", alice), ("bob", bob)):
            seen[name] += await events_until(session, 1)
            with trio.fail_after(FAST):
                while not any(isinstance(e, Recovered) for e in seen[name]):
                    seen[name].append(await session.receive())
    for events in seen.values():
        assert texts(events) == ["x", "y"]
        assert Recovered(quiet, True) in events


async def test_backlog_larger_than_the_outbound_buffer_resumes(
    servers: Servers, pki: TestPki
) -> None:
    """75 x 60 KiB published while bob is away (more than the server's 4 MiB buffer for a
    connection): the replay is paged as bob reads, so he gets all of it, once, in order."""
    big = 60 * 1024
    first = await servers.start()
    async with resilient_as(first.ws_url, first, pki) as bob:
        await bob.subscribe(LOBBY)
        await servers.stop()
        aside = await servers.start(elsewhere=True)
        async with chat_as(aside, pki, "alice") as alice:
            for n in range(75):
                await alice.send(LOBBY, f"{n:02d}".encode() + b"." * big)
        await servers.stop()
        await servers.start()
        events: list[Event] = []
        with trio.fail_after(4 * FAST):
            while sum(isinstance(e, Message) for e in events) < 75:
                events.append(await bob.receive())
    got = [e for e in events if isinstance(e, Message)]
    assert [m.body[:2].decode() for m in got] == [f"{n:02d}" for n in range(75)]
    assert all(len(m.body) == big + 2 for m in got)
    assert Recovered(LOBBY, True) in events
    assert not any(isinstance(e, Reconnecting) and "slow" in e.reason for e in events)


async def test_join_with_history_then_live(server: RunningServer, pki: TestPki) -> None:
    """`last=N`: the room's last N messages first, marked as history, then live ones."""
    async with chat_as(server, pki, "alice") as alice:
        for n in range(1, 5):
            await alice.send(LOBBY, f"m{n}")
        async with resilient_as(server.ws_url, server, pki) as bob:
            await bob.subscribe(LOBBY, last=2)
            await alice.send(LOBBY, "m5")
            events = await events_until(bob, 3)
    shown = [(e.text, e.history) for e in events if isinstance(e, Message)]
    assert shown == [("m3", True), ("m4", True), ("m5", False)]


async def test_send_while_offline_waits_for_the_link(servers: Servers, pki: TestPki) -> None:
    """A send issued while offline goes out once the link is back and resubscribed (so the
    sender, in the room too, sees it come back)."""
    first = await servers.start()
    async with resilient_as(first.ws_url, first, pki) as bob:
        await bob.subscribe(LOBBY)
        await servers.stop()
        await until(bob, Reconnecting)
        assert not bob.online
        delivered = trio.Event()

        async def send_later() -> None:
            await bob.send(LOBBY, "queued while offline")
            delivered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_later)
            for _ in range(2):  # at least one more attempt fails while the send waits
                await until(bob, Reconnecting)
            assert not delivered.is_set()
            await servers.start()
            with trio.fail_after(FAST):
                await delivered.wait()
        events = await events_until(bob, 1)
    got = next(e for e in events if isinstance(e, Message))
    assert (got.sender, got.text) == ("bob", "queued while offline")


async def test_send_gives_up_after_its_timeout(servers: Servers, pki: TestPki) -> None:
    first = await servers.start()
    patient = replace(QUICK, send_timeout=0.3)
    async with resilient_as(first.ws_url, first, pki, resilience=patient) as bob:
        await servers.stop()
        with pytest.raises(NotDelivered) as failed:
            await bob.send(LOBBY, "nobody home")
        assert not failed.value.maybe_delivered


async def test_sends_queued_together_give_up_together(servers: Servers, pki: TestPki) -> None:
    """The send timeout counts from when a line was queued, not from its turn: a line
    queued long enough ago while offline is reported at once."""
    first = await servers.start()
    async with resilient_as(first.ws_url, first, pki) as bob:
        await servers.stop()
        with trio.fail_after(QUICK.send_timeout / 2), pytest.raises(NotDelivered) as failed:
            await bob.send(LOBBY, "typed long ago", queued_at=trio.current_time() - FAST)
        assert not failed.value.maybe_delivered


async def test_a_busy_server_at_start_is_tried_again_then_reported(
    start_server: StartServer, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token requests answered 503 storage_unavailable (here: the server's refresh-token
    table is gone) are retried like an unreachable server, then reported as they are."""
    server = await start_server()
    state = sqlite3.connect(server.config.state_dir / "state.db", isolation_level=None)
    try:
        state.execute("DROP TABLE refresh_tokens")
    finally:
        state.close()
    tried: list[str] = []
    real = server.server.state.issue_refresh

    def counted(*args: Any) -> str:
        tried.append(args[0])
        return real(*args)

    monkeypatch.setattr(server.server.state, "issue_refresh", counted)
    with trio.fail_after(FAST), pytest.raises(ServerBusy) as busy:
        async with resilient_as(server.ws_url, server, pki):
            pass
    assert (busy.value.status, busy.value.code) == (503, "storage_unavailable")
    assert tried == ["bob"] * QUICK.start_attempts


async def test_revoked_identity_ends_the_session(start_server: StartServer, pki: TestPki) -> None:
    """Revocation closes the link; the reconnect is refused a token: that is final."""
    server = await start_server(revocation_poll=0.1)
    async with resilient_as(server.ws_url, server, pki, name="carol") as carol:
        server.server.state.revoke_sub("carol", time.time())
        with trio.fail_after(FAST), pytest.raises(TokenRefused) as refused:
            async for _ in carol:
                pass
        assert (refused.value.status, refused.value.code) == (403, "identity_revoked")
        with pytest.raises(TokenRefused):
            await carol.send(LOBBY, "too late")


async def test_wildcard_and_exact_room_resume_once(servers: Servers, pki: TestPki) -> None:
    """A topic reached through two rooms (dev.# and dev.backend) is delivered once, and
    after a restart the exact room's replay is not lost behind the wildcard's live copies."""
    backend, everything = "/topic/dev.backend", "/topic/dev.#"
    first = await servers.start()
    async with resilient_as(first.ws_url, first, pki) as bob:
        await bob.subscribe(everything)
        await bob.subscribe(backend)
        async with chat_as(first, pki, "alice") as alice:
            await alice.send(backend, "b1")
            await alice.send("/topic/dev.frontend", "f1")
        events = await events_until(bob, 2)
        await servers.stop()
        aside = await servers.start(elsewhere=True)
        async with chat_as(aside, pki, "alice") as alice:
            await alice.send(backend, "b2")
        await servers.stop()
        second = await servers.start()
        events += await events_until(bob, 1)
        async with chat_as(second, pki, "alice") as alice:
            await alice.send(backend, "b3")
        events += await events_until(bob, 1)
        with trio.fail_after(FAST):
            while Recovered(everything, False) not in events:
                events.append(await bob.receive())
    assert texts(events) == ["b1", "f1", "b2", "b3"]
    assert Recovered(backend, True) in events
