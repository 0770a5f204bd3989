"""Bounds on what one peer can do (issue 11): a broken WebSocket is named and closed at once,
the guard sleeps until something is due, a fast publisher is slowed and never dropped.

Connection-level cases run below TLS on the mock clock (tests/below_tls.py); the peer speaks
raw WebSocket through a client-side wsproto so it can break the framing on purpose.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.frame_protocol import CloseReason

from chat.protocol import events
from chat.protocol.stomp import Frame, encode
from chat.protocol.tokens import Claims, TokenAuthority
from chat.server.connection import GUARD_TICK, guard_wake
from chat.server.rate import TokenBucket
from chat.server.session import SessionLimits, Shared, StompSession
from tests.below_tls import BelowTls
from tests.test_server_policy import (
    NOW,
    X5T,
    RecordingOutbox,
    Room,
    frame,
    refused,
    subscribe,
)


class RawPeer:
    """A WebSocket client over the server's memory stream, sending what it likes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, below: BelowTls, name: str = "alice") -> RawPeer:
        """Upgrade, CONNECT, and wait for CONNECTED."""
        token = await below.token(name)
        peer = cls(below.open_stream(name))
        offer = ["v12.stomp", f"bearer.{token}"]
        await peer.stream.send_all(peer.ws.send(Request("chat.test", "/ws", subprotocols=offer)))
        assert isinstance(await peer.next_event(), AcceptConnection)
        await peer.send_text("CONNECT\naccept-version:1.2\nhost:chat\n\n\x00")
        reply = await peer.next_event()
        assert isinstance(reply, TextMessage) and reply.data.startswith("CONNECTED")
        return peer

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(text)))

    async def next_event(self) -> object:
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some()
            assert data, "the server closed the stream"
            self.ws.receive_data(data)

    async def closed_at(self) -> float:
        """Read until the server closes the stream; when it did."""
        while await self.stream.receive_some():
            pass
        return trio.current_time()


def masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set), masked with a zero key: the payload reads as is."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


# ---------------------------------------------------------------- WebSocket protocol errors


@pytest.mark.parametrize(
    ("bad", "code", "reason"),
    [
        (b"\x81\x02hi", CloseReason.PROTOCOL_ERROR, "server received unexpected unmasked frame"),
        (masked(0x3, b""), CloseReason.PROTOCOL_ERROR, "Invalid opcode 0x3"),
        (
            masked(0x1, b"\xff\xfe"),
            CloseReason.INVALID_FRAME_PAYLOAD_DATA,
            "can't decode byte 0xff",
        ),
        (
            bytes([0x89, 0x80 | 126, 0, 126]) + b"\0\0\0\0" + b"p" * 126,
            CloseReason.PROTOCOL_ERROR,
            "Control frame with payload len > 125",
        ),
    ],
    ids=["unmasked", "bad-opcode", "bad-utf8", "oversized-ping"],
)
async def test_websocket_protocol_error_is_named_and_closed_on_the_answer(
    start_below_tls, autojump_clock, bad: bytes, code: int, reason: str
) -> None:
    """The close says what the peer did wrong, and the server drops the stream as soon as the
    peer answers the close: not after close_timeout, though the framing was broken."""
    below: BelowTls = await start_below_tls(close_timeout=30)
    peer = await RawPeer.connect(below)
    await peer.stream.send_all(bad)
    close = await peer.next_event()
    assert isinstance(close, CloseConnection)
    assert close.code == code and reason in close.reason
    answered = trio.current_time()
    await peer.stream.send_all(peer.ws.send(close.response()))
    assert await peer.closed_at() - answered < below.config.close_timeout


# ---------------------------------------------------------------- subscriptions per identity


@pytest.fixture
def room(authority: TokenAuthority) -> Room:
    return Room(authority)


def sessions_of_one_server(room: Room, per_identity: int, *subs: str) -> list[StompSession]:
    """Sessions (one per connection) on one Shared, as a server's are."""
    shared = Shared(
        room.broker,
        room.presence,
        lambda: room.policy,
        room.authority,
        lambda claims: False,
        room.clock,
        SessionLimits(8, (0, 0), max_subscriptions_per_identity=per_identity),
    )
    return [
        StompSession(RecordingOutbox(), Claims("chat", sub, 0, 0, int(NOW + 60), sub, X5T), shared)
        for sub in subs
    ]


def test_subscriptions_are_bounded_per_identity_across_its_connections(room: Room) -> None:
    first, second, bob = sessions_of_one_server(room, 3, "alice", "alice", "bob")
    first.handle(subscribe("/topic/#", "a"))
    first.handle(subscribe("/topic/#", "b"))
    second.handle(subscribe("/topic/#", "a"))
    error = refused(lambda: second.handle(subscribe("/topic/#", "b")), "too many subscriptions")
    assert "at most 3 subscriptions per identity" in error.detail
    for sub_id in "abc":  # another identity has its own bound
        bob.handle(subscribe("/topic/#", sub_id))


def test_unsubscribe_and_close_free_an_identitys_subscriptions(room: Room) -> None:
    first, second, third = sessions_of_one_server(room, 2, "alice", "alice", "alice")
    first.handle(subscribe("/topic/#", "a"))
    first.handle(subscribe("/topic/lobby", "b"))
    refused(lambda: second.handle(subscribe("/topic/#", "a")), "too many subscriptions")
    first.handle(events.Unsubscribe(frame("UNSUBSCRIBE", id="a"), "a"))
    second.handle(subscribe("/topic/#", "a"))
    refused(lambda: third.handle(subscribe("/topic/#", "a")), "too many subscriptions")
    first.close()  # the connection went away: its remaining subscription with it
    third.handle(subscribe("/topic/#", "a"))


async def test_identity_over_its_subscription_bound_gets_error_and_1008(
    start_below_tls, autojump_clock
) -> None:
    """Over the wire: the bound spans alice's two connections; closing one frees its share."""
    below: BelowTls = await start_below_tls(max_subscriptions_per_identity=2)
    async with below.stomp_peer("alice") as first:
        await first.send("SUBSCRIBE", {"destination": "/topic/#", "id": "0"})
        async with below.stomp_peer("alice") as second:
            await second.send("SUBSCRIBE", {"destination": "/topic/#", "id": "0"})
            await second.send("SUBSCRIBE", {"destination": "/topic/x", "id": "1", "receipt": "r"})
            error = await second.receive()
            assert (error.command, error.get("message")) == ("ERROR", "too many subscriptions")
            assert error.get("receipt-id") == "r"
            with pytest.raises(ConnectionClosed) as info:
                await second.receive()
            assert info.value.reason.code == 1008
        await first.send("SUBSCRIBE", {"destination": "/topic/x", "id": "1", "receipt": "ok"})
        assert (await first.receive()).get("receipt-id") == "ok"


# ---------------------------------------------------------------- the guard sleeps until due


class GuardSteps(trio.abc.Instrument):
    """Counts how often any connection's guard task runs: each run is one wake-up."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Connection._guard"):
            self.steps += 1


def test_the_guard_looks_next_at_the_first_thing_due() -> None:
    assert guard_wake(100.0, None, 30.0) == 130.0  # token expiry
    assert guard_wake(100.0, 110.0, 30.0) == 110.0  # a heart-beat first
    assert guard_wake(100.0, None, 10_000.0) == 100.0 + GUARD_TICK  # the wall clock re-read
    assert guard_wake(100.0, 99.0, 30.0) == 99.0  # overdue: at once


async def test_an_idle_connection_wakes_its_guard_only_when_something_is_due(
    start_below_tls, autojump_clock
) -> None:
    """No heart-beats: an hour-long token wakes the guard once per GUARD_TICK (the old guard
    woke every second), and the connection ends at `exp` exactly, not a tick later."""
    below: BelowTls = await start_below_tls(token_lifetime=3000)
    steps = GuardSteps()
    async with below.stomp_peer("alice") as alice:
        await alice.send("SUBSCRIBE", {"destination": "/topic/quiet", "id": "0"})
        expires_in = below.server.connections.copy().pop().session.expires_in()
        trio.lowlevel.add_instrument(steps)
        start = trio.current_time()
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await alice.ws.get_message()
        trio.lowlevel.remove_instrument(steps)
        assert trio.current_time() - start == pytest.approx(expires_in)
    assert info.value.reason.code == 1008 and "token expired" in str(info.value.reason.reason)
    assert steps.steps <= 3000 / GUARD_TICK + 2


async def test_heartbeats_wake_the_guard_once_per_beat(start_below_tls, autojump_clock) -> None:
    """The client wants a beat every 10 s: the guard wakes to send each one, and no more."""
    below: BelowTls = await start_below_tls(token_lifetime=3000)
    steps = GuardSteps()
    async with below.stomp_peer("alice", heartbeat="0,10000") as alice:
        trio.lowlevel.add_instrument(steps)
        beats = 0
        with trio.move_on_after(1000):
            while True:
                assert await alice.ws.get_message() == "\n"
                beats += 1
        trio.lowlevel.remove_instrument(steps)
    assert beats >= 99  # one every 10 s (the 100th falls on the edge)
    assert steps.steps <= beats + 2


# ---------------------------------------------------------------- publish rate per connection


def test_a_full_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(5)] == [0.0] * 5
    assert [bucket.reserve(0.0) for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])


def test_a_caller_that_waits_gets_exactly_the_rate() -> None:
    """Acting at each reserved time (the connection's reader): 20 past the burst at 10/s."""
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    now = 0.0
    for _ in range(25):
        now = bucket.reserve(now)
    assert now == pytest.approx(2.0)


def test_the_bucket_refills_while_idle_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    for _ in range(3):
        bucket.reserve(0.0)
    assert bucket.reserve(1.0) == 1.0  # two tokens came back in 1 s
    assert bucket.reserve(1.0) == 1.0
    assert bucket.reserve(1.0) == 1.5
    assert [bucket.reserve(100.0) for _ in range(4)] == [100.0, 100.0, 100.0, 100.5]


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_bucket_needs_a_rate_and_a_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


async def test_a_fast_publisher_is_slowed_never_dropped(start_below_tls, autojump_clock) -> None:
    """60 SENDs at once against 10/s with bursts of 10: every one is delivered, the last after
    5 s; the publisher gets its RECEIPT, and another publisher's message overtakes."""
    below: BelowTls = await start_below_tls(publish_rate=10.0, publish_burst=10)
    async with (
        below.stomp_peer("bob") as bob,
        below.stomp_peer("alice") as alice,
        below.stomp_peer("carol") as carol,
    ):
        await bob.send("SUBSCRIBE", {"destination": "/topic/room", "id": "0", "receipt": "s"})
        assert (await bob.receive()).get("receipt-id") == "s"
        start = trio.current_time()
        for n in range(60):
            await alice.send("SEND", {"destination": "/topic/room", "receipt": f"a{n}"}, b"%d" % n)
        await trio.sleep(1)
        await carol.send("SEND", {"destination": "/topic/room"}, b"carol")
        received = []
        while len(received) < 61:
            received.append(((await bob.receive(10)).body, trio.current_time() - start))
        bodies = [body for body, _ in received]
        assert sorted(bodies) == sorted([b"%d" % n for n in range(60)] + [b"carol"])
        assert bodies.index(b"carol") < 30  # not behind alice's backlog
        assert received[-1][1] == pytest.approx(5.0)  # 50 past the burst, at 10/s
        receipts = [(await alice.receive()).get("receipt-id") for _ in range(60)]
        assert receipts == [f"a{n}" for n in range(60)]


async def test_a_throttled_publisher_is_not_silent(start_below_tls, autojump_clock) -> None:
    """Its heart-beats sit behind SENDs the server has not taken yet: waiting for the publish
    rate is ours, so it is not the peer's silence (a beat every 2 s, 20 SENDs at 1/s)."""
    below: BelowTls = await start_below_tls(publish_rate=1.0, publish_burst=1, heartbeat=(0, 2000))
    async with below.stomp_peer("bob") as bob, below.stomp_peer("alice", "2000,0") as alice:
        await bob.send("SUBSCRIBE", {"destination": "/topic/room", "id": "0", "receipt": "s"})
        assert (await bob.receive()).get("receipt-id") == "s"
        async with trio.open_nursery() as nursery:

            async def beat() -> None:
                while True:
                    await trio.sleep(2)
                    await alice.ws.send_message("\n")

            nursery.start_soon(beat)
            sends = [Frame("SEND", (("destination", "/topic/room"),), b"%d" % n) for n in range(20)]
            await alice.ws.send_message(b"".join(map(encode, sends)))  # read at once, taken in 19 s
            bodies = [(await bob.receive(30)).body for _ in range(20)]
            assert bodies == [b"%d" % n for n in range(20)]
            await alice.send("SEND", {"destination": "/topic/room", "receipt": "alive"})
            assert (await alice.receive(30)).get("receipt-id") == "alive"
            nursery.cancel_scope.cancel()
