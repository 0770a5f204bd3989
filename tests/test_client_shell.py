"""The client's trio shell below TLS: a memory stream, a fake server, a mock clock.

The far end is trio-websocket's server side speaking STOMP through a `StompConnection`
in the server role. Time is `MockClock(autojump_threshold=0)` (pytest-trio's
`autojump_clock`): heart-beats, silence and receipt timeouts are exact and instant.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from chat.client.connection import StompClient, stomp_over
from chat.client.errors import (
    BadResponse,
    ConnectionLost,
    ReceiptTimeout,
    ServerUnreachable,
    SilentRefusal,
    StompError,
    TokenRefused,
)
from chat.client.tls import Endpoint, ServerUrl
from chat.client.websocket import websocket_over
from chat.protocol import events
from chat.protocol.connection import Role, StompConnection
from chat.protocol.stomp import Frame

URL = ServerUrl("wss", Endpoint("chat.test", 443), "/ws")
OFFER = ["v12.stomp", "bearer.t"]
TIMEOUT = 10.0


class FakeServer:
    """One STOMP session on trio-websocket's server side, driven by hand."""

    def __init__(self, ws: WebSocketConnection, stream: trio.abc.Stream) -> None:
        self.ws = ws
        self.stream = stream  # under the WebSocket: closing it is the peer vanishing
        self.protocol = StompConnection(Role.SERVER)
        self.heard: list[tuple[float, str | bytes]] = []  # every WebSocket message, timed

    async def next_event(self) -> events.Event:
        while (event := self.protocol.next_event()) is None:
            message = await self.ws.get_message()
            self.heard.append((trio.current_time(), message))
            data = message.encode() if isinstance(message, str) else message
            self.protocol.receive_data(data, trio.current_time())
        return event

    async def send(self, *frames: Frame) -> None:
        await self.ws.send_message(b"".join(self.protocol.send(f) for f in frames).decode())

    async def accept(self, heartbeat: str = "0,0") -> None:
        assert isinstance(await self.next_event(), events.Connect)
        await self.send(
            Frame(
                "CONNECTED",
                (
                    ("version", "1.2"),
                    ("heart-beat", heartbeat),
                    ("session", "fake"),
                    ("user-name", "alice"),
                ),
            )
        )

    async def answer_all(self) -> None:
        """RECEIPT whatever asks for one, until the client leaves."""
        while True:
            event = await self.next_event()
            if event.receipt is not None:
                await self.send(receipt(event.receipt))

    def beats(self, since: float) -> list[float]:
        return [round(at - since, 3) for at, message in self.heard if message == "\n"]


Script = Callable[[FakeServer], Awaitable[None]]


def receipt(receipt_id: str) -> Frame:
    return Frame("RECEIPT", (("receipt-id", receipt_id),))


def message(n: int, subscription: str) -> Frame:
    return Frame(
        "MESSAGE",
        (
            ("destination", "/topic/lobby"),
            ("subscription", subscription),
            ("message-id", str(n)),
            ("sender", "bob"),
            ("timestamp", "1700000000000"),
        ),
        f"m{n}".encode(),
    )


def raw_server(
    nursery: trio.Nursery, serve: Callable[[trio.abc.Stream], Awaitable[None]]
) -> trio.abc.Stream:
    """A memory stream whose far end `serve` handles; returns the client's end."""
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(serve, theirs)
    return ours


@asynccontextmanager
async def client_of(
    nursery: trio.Nursery, script: Script, heartbeat: tuple[int, int] = (0, 0)
) -> AsyncIterator[StompClient]:
    async def serve(stream: trio.abc.Stream) -> None:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        ws = await request.accept(subprotocol="v12.stomp")
        with suppress(ConnectionClosed):
            await script(FakeServer(ws, stream))

    stream = raw_server(nursery, serve)
    async with (
        websocket_over(stream, URL, OFFER, TIMEOUT) as link,
        stomp_over(link, "chat", heartbeat) as client,
    ):
        yield client


# ---------------------------------------------------------------- heart-beats and silence


async def test_an_idle_client_beats_on_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The server wants a beat every 10 s; any frame sent puts the next one off."""
    server: list[FakeServer] = []

    async def script(fake: FakeServer) -> None:
        server.append(fake)
        await fake.accept(heartbeat="0,10000")
        await fake.answer_all()

    async with client_of(nursery, script, heartbeat=(10000, 0)) as client:
        start = trio.current_time()
        assert client.heartbeat == (10000, 0)
        await trio.sleep(25)
        await client.send("/topic/lobby", "hello", receipt=False)  # at 25 s
        await trio.sleep(21)  # leaving at 46 s, not as the beat at 45 s falls due
    assert server[0].beats(start) == [10, 20, 35, 45]


async def test_a_silent_server_is_dead_after_twice_the_interval(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def script(fake: FakeServer) -> None:
        await fake.accept(heartbeat="10000,0")
        await trio.sleep_forever()  # reads nothing, says nothing

    async with client_of(nursery, script, heartbeat=(0, 10000)) as client:
        start = trio.current_time()
        with pytest.raises(ConnectionLost) as lost:
            await client.receive()
        assert trio.current_time() - start == 20
    assert str(lost.value) == (
        "the server went silent: nothing received for 20.0 s (heart-beats were due every 10 s)"
    )


async def test_a_beating_server_is_never_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def script(fake: FakeServer) -> None:
        await fake.accept(heartbeat="10000,0")
        while True:
            await trio.sleep(10)
            await fake.ws.send_message("\n")

    async with client_of(nursery, script, heartbeat=(0, 10000)) as client:
        await trio.sleep(600)
        assert client.failure is None


# ---------------------------------------------------------------- receipts and ERROR


async def test_a_late_receipt_is_a_timeout_and_then_ignored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def script(fake: FakeServer) -> None:
        await fake.accept()
        first = await fake.next_event()
        await trio.sleep(15)  # past the client's RECEIPT_TIMEOUT
        assert first.receipt is not None
        await fake.send(receipt(first.receipt))
        await fake.answer_all()

    async with client_of(nursery, script) as client:
        with pytest.raises(ReceiptTimeout, match="no RECEIPT for SEND within 10 s"):
            await client.send("/topic/lobby", "slow")
        await trio.sleep(10)  # the late RECEIPT arrives meanwhile: no harm
        await client.send("/topic/lobby", "answered")
        assert client.failure is None


async def test_an_error_mid_stream_fails_the_waiting_send(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def script(fake: FakeServer) -> None:
        await fake.accept()
        subscribe = await fake.next_event()
        assert isinstance(subscribe, events.Subscribe) and subscribe.receipt is not None
        await fake.send(receipt(subscribe.receipt), message(1, subscribe.id))
        send = await fake.next_event()
        assert send.receipt is not None
        await fake.send(
            Frame(
                "ERROR",
                (("message", "forbidden"), ("receipt-id", send.receipt)),
                b"not in this room",
            )
        )
        await fake.ws.aclose(1008)

    async with client_of(nursery, script) as client:
        await client.subscribe("/topic/lobby")
        with pytest.raises(StompError) as failed:
            await client.send("/topic/lobby", "x")
        assert str(failed.value) == "the server sent ERROR: forbidden: not in this room"
        assert (await client.receive()).text == "m1"  # what came before the ERROR
        with pytest.raises(StompError) as again:
            await client.receive()
        assert again.value is failed.value


async def test_a_server_breaking_stomp_is_closed_1002(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    closed: list[int] = []

    async def script(fake: FakeServer) -> None:
        await fake.accept()
        await fake.ws.send_message("CONNECTED\n\n\0")  # again
        with suppress(ConnectionClosed):
            await fake.ws.get_message()
        assert fake.ws.closed is not None
        closed.append(fake.ws.closed.code)

    async with client_of(nursery, script) as client:
        with pytest.raises(ConnectionLost, match="the server broke STOMP: unexpected CONNECTED"):
            await client.receive()
    assert closed == [1002]


async def test_a_frame_we_may_not_send_ends_the_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A receipt id of the caller's own, still awaited: sending it again is our mistake."""

    async def script(fake: FakeServer) -> None:
        await fake.accept()
        await trio.sleep_forever()

    async with client_of(nursery, script) as client:
        mine = [("receipt", "mine")]
        await client.send("/topic/lobby", "a", receipt=False, headers=mine)
        with pytest.raises(ConnectionLost) as refused:
            await client.send("/topic/lobby", "b", receipt=False, headers=mine)
        assert str(refused.value) == (
            "closed: cannot send SEND: receipt id 'mine' is already awaited"
        )
        assert client.failure is refused.value


# ---------------------------------------------------------------- what the adapter adds


async def test_a_refused_upgrade_carries_its_json_code(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def serve(stream: trio.abc.Stream) -> None:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        body = json.dumps({"error": "token_expired", "detail": "the token expired"}).encode()
        await request.reject(401, body=body)

    with pytest.raises(TokenRefused) as refused:
        async with websocket_over(raw_server(nursery, serve), URL, OFFER, TIMEOUT):
            pass
    assert (refused.value.status, refused.value.code) == (401, "token_expired")
    assert str(refused.value) == (
        "the server refused our token (HTTP 401 token_expired: the token expired)"
    )


async def test_a_close_before_the_upgrade_is_a_refusal_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """TLS 1.3 reports a refused client certificate only at the first read: trio-websocket
    alone would wait for its 101 forever; we report it as soon as the stream ends."""

    async def serve(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.aclose()

    start = trio.current_time()
    with pytest.raises(SilentRefusal, match="most likely rejected our client certificate"):
        async with websocket_over(raw_server(nursery, serve), URL, OFFER, TIMEOUT):
            pass
    assert trio.current_time() == start  # no timeout ran out


async def test_a_server_that_does_not_speak_websocket(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def serve(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        await trio.sleep_forever()

    with pytest.raises(BadResponse, match="chat.test:443 does not speak WebSocket as expected"):
        async with websocket_over(raw_server(nursery, serve), URL, OFFER, TIMEOUT):
            pass


async def test_an_upgrade_never_answered_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def serve(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    start = trio.current_time()
    with pytest.raises(ServerUnreachable) as unanswered:
        async with websocket_over(raw_server(nursery, serve), URL, OFFER, TIMEOUT):
            pass
    assert str(unanswered.value) == (
        "chat.test:443 did not complete the WebSocket handshake within 10 s"
    )
    assert trio.current_time() - start == TIMEOUT


async def test_a_broken_stream_says_why_not_1006(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def script(fake: FakeServer) -> None:
        await fake.accept()
        await fake.stream.aclose()  # the peer's process dies: no close frame

    async with client_of(nursery, script) as client:
        with pytest.raises(ConnectionLost) as lost:
            await client.receive()
    assert str(lost.value) == "chat.test:443 closed the connection"
    assert lost.value.code is None


async def test_no_stomp_subprotocol_selected(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def serve(stream: trio.abc.Stream) -> None:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        await request.accept()  # selects none
        await trio.sleep_forever()

    with pytest.raises(BadResponse, match="did not select the v12.stomp subprotocol"):
        async with (
            websocket_over(raw_server(nursery, serve), URL, OFFER, TIMEOUT) as link,
            stomp_over(link, "chat", (0, 0)),
        ):
            pass
