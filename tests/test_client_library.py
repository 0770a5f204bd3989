"""The client library against the real server (and, for misbehaviour, a scripted fake one).

Real TLS and real trio-websocket throughout. The fake server is a few lines of
trio-websocket that speaks STOMP by hand: it is how we make a server coalesce frames
into one WebSocket message, delay a RECEIPT, or go silent.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from chat import pki as pki_module
from chat.client.auth import open_chat
from chat.client.connection import StompClient, connect
from chat.client.errors import (
    BadResponse,
    ConnectionLost,
    ServerUnreachable,
    StompError,
    TlsFailure,
    TokenRefused,
)
from chat.client.http import TokenGrant, fetch_token
from chat.client.messages import Message
from chat.protocol.stomp import CLIENT_COMMANDS, Frame, FrameParser, encode
from tests.below_tls import BelowTls
from tests.conftest import RunningServer, StartServer, StompPeer, TestPki, raw_ws, token_for

FAST = 5  # seconds: every wait in these tests is local and should take milliseconds


@asynccontextmanager
async def chat_as(
    server: RunningServer, pki: TestPki, name: str, heartbeat: tuple[int, int] = (10000, 10000)
) -> AsyncIterator[StompClient]:
    cert, key = pki.client(name)
    async with open_chat(server.ws_url, cert, key, pki.ca, heartbeat=heartbeat) as client:
        yield client


async def next_message(client: StompClient) -> Message:
    with trio.fail_after(FAST):
        return await client.receive()


# ---------------------------------------------------------------- a scripted fake server

Script = Callable[[WebSocketConnection, FrameParser], Awaitable[None]]


async def start_fake(nursery: trio.Nursery, pki: TestPki, script: Script) -> str:
    """A mutual-TLS WebSocket server that runs `script` per connection; returns its wss URL."""
    context = pki_module.server_ssl_context(pki.dir / "server.crt", pki.dir / "server.key", pki.ca)

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="v12.stomp")
        with suppress(ConnectionClosed):
            await script(ws, FrameParser(commands=CLIENT_COMMANDS))

    server = await nursery.start(
        partial(
            serve_websocket, handler, "127.0.0.1", 0, ssl_context=context, handler_nursery=nursery
        )
    )
    return f"wss://127.0.0.1:{server.port}/ws"


async def read_frame(ws: WebSocketConnection, parser: FrameParser) -> Frame:
    while True:
        message = await ws.get_message()
        frames = parser.feed(message.encode() if isinstance(message, str) else message)
        if frames:
            return frames[0]


async def answer_receipts(ws: WebSocketConnection, parser: FrameParser) -> None:
    """The rest of a fake session: RECEIPT whatever asks for one; DISCONNECT ends it."""
    while True:
        frame = await read_frame(ws, parser)
        receipt = frame.get("receipt")
        if receipt is not None:
            await ws.send_message(wire(Frame("RECEIPT", (("receipt-id", receipt),))))
        if frame.command == "DISCONNECT":
            await ws.aclose()
            return


def wire(*frames: Frame) -> str:
    """Several frames in one WebSocket message."""
    return b"".join(encode(frame) for frame in frames).decode()


def connected(heartbeat: str = "0,0") -> Frame:
    return Frame(
        "CONNECTED",
        (
            ("version", "1.2"),
            ("heart-beat", heartbeat),
            ("session", "fake-1"),
            ("user-name", "alice"),
        ),
    )


def message(n: int, subscription: str) -> Frame:
    return Frame(
        "MESSAGE",
        (
            ("destination", "/topic/lobby"),
            ("subscription", subscription),
            ("message-id", str(n)),
            ("sender", "bob"),
            ("timestamp", "1700000000000"),
            ("content-length", "5"),
        ),
        f"msg-{n}".encode(),
    )


# ---------------------------------------------------------------- chatting through the real server


async def test_two_clients_chat(server: RunningServer, pki: TestPki) -> None:
    async with chat_as(server, pki, "alice") as alice, chat_as(server, pki, "bob") as bob:
        assert (alice.user_name, bob.user_name) == ("alice", "bob")
        assert alice.session and alice.session != bob.session
        sub_id = (await bob.subscribe("/topic/lobby")).id
        before = time.time() * 1000
        await alice.send("/topic/lobby", "hello, bob")
        got = await next_message(bob)
    assert got.sender == "alice"
    assert got.text == "hello, bob" and got.body == b"hello, bob"
    assert got.destination == "/topic/lobby" and got.subscription == sub_id
    assert got.message_id
    assert before - 1000 <= got.timestamp <= time.time() * 1000 + 1000


async def test_subscribe_receipt_means_active(server: RunningServer, pki: TestPki) -> None:
    """subscribe() returns after the RECEIPT: a message sent right after it is delivered."""
    async with chat_as(server, pki, "alice") as alice, chat_as(server, pki, "bob") as bob:
        for n in range(5):
            await bob.subscribe(f"/topic/room{n}")
            await alice.send(f"/topic/room{n}", f"m{n}")
            assert (await next_message(bob)).text == f"m{n}"


async def test_wildcards_unsubscribe_and_binary(server: RunningServer, pki: TestPki) -> None:
    async with chat_as(server, pki, "alice") as alice, chat_as(server, pki, "bob") as bob:
        sub_id = (await bob.subscribe("/topic/dev.#")).id
        await alice.send("/topic/dev.backend", b"\x00\xff binary", content_type="application/x")
        got = await next_message(bob)
        assert (got.destination, got.body) == ("/topic/dev.backend", b"\x00\xff binary")
        await bob.unsubscribe(sub_id)
        await bob.subscribe("/topic/other")
        await alice.send("/topic/dev.x", "not for bob any more")
        await alice.send("/topic/other", "for bob")
        assert (await next_message(bob)).text == "for bob"


async def test_frames_coalesced_by_a_raw_client(server: RunningServer, pki: TestPki) -> None:
    """Two SENDs in one WebSocket message from a raw peer both reach the library's receiver."""
    async with chat_as(server, pki, "bob") as bob, raw_ws(server, pki, "alice") as ws:
        await bob.subscribe("/topic/lobby")
        peer = StompPeer(ws)
        await peer.connect()
        sends = [
            Frame("SEND", (("destination", "/topic/lobby"),), f"n{n}".encode()) for n in (1, 2)
        ]
        await ws.send_message(wire(*sends))
        assert [(await next_message(bob)).text for _ in sends] == ["n1", "n2"]


async def test_iteration_ends_quietly_after_disconnect(server: RunningServer, pki: TestPki) -> None:
    async with chat_as(server, pki, "alice") as alice:
        await alice.subscribe("/topic/lobby")
        await alice.send("/topic/lobby", "to myself")
        await alice.disconnect()
        with trio.fail_after(FAST):
            texts = [m.text async for m in alice]
        assert texts == ["to myself"]  # what arrived before the disconnect is still delivered
        with pytest.raises(ConnectionLost):
            await alice.send("/topic/lobby", "too late")


async def test_server_shutdown_is_1001(server: RunningServer, pki: TestPki) -> None:
    async with chat_as(server, pki, "alice") as alice:
        server.server.shutdown()
        with pytest.raises(ConnectionLost) as lost:
            await next_message(alice)
    assert lost.value.code == 1001
    assert "shutting down" in str(lost.value)


# ---------------------------------------------------------------- below TLS, on the mock clock


async def test_heartbeats_keep_an_idle_connection(start_below_tls, autojump_clock) -> None:
    """Both sides beat every 200 ms; idle for 75 times either side's 400 ms death limit."""
    below: BelowTls = await start_below_tls(heartbeat=(200, 200))
    async with below.client("alice", heartbeat=(200, 200)) as alice:
        assert alice.heartbeat == (200, 200)
        await alice.subscribe("/topic/lobby")
        await trio.sleep(30)
        await alice.send("/topic/lobby", "still here")
        assert (await next_message(alice)).text == "still here"
        assert alice.failure is None


async def test_token_is_renewed_in_band(start_below_tls, autojump_clock) -> None:
    """A 60 s token (the server closes the connection at its exp): the client renews it in time,
    again and again, on the same connection."""
    below: BelowTls = await start_below_tls(token_lifetime=60)
    grant = await below.grant("alice")
    renewed: list[float] = []

    async def renew() -> TokenGrant:
        renewed.append(trio.current_time())
        return await below.grant("alice")

    async with below.client("alice", token=grant.access_token) as alice:
        alice.keep_authorized(renew, grant.expires_in)
        await alice.subscribe("/topic/lobby")
        await trio.sleep(200)  # over three lifetimes of a token
        await alice.send("/topic/lobby", "after the first token expired")
        assert (await next_message(alice)).text == "after the first token expired"
        assert alice.failure is None
    assert len(renewed) >= 4


# ---------------------------------------------------------------- failures, each with its type


async def test_error_frame_is_a_sticky_stomp_error(server: RunningServer, pki: TestPki) -> None:
    async with chat_as(server, pki, "alice") as alice:
        with pytest.raises(StompError) as error:
            await alice.send("/topic/bad..name", "x")
        assert error.value.message.startswith("invalid destination")
        assert error.value.detail
        with pytest.raises(StompError) as again:
            await next_message(alice)
        assert again.value is error.value


async def test_refused_handshake_is_token_refused(server: RunningServer, pki: TestPki) -> None:
    context = pki.client_context("alice")
    with pytest.raises(TokenRefused) as refused:
        async with connect(server.ws_url, context, "not-a-jwt"):
            pass
    assert (refused.value.status, refused.value.code) == (401, "invalid_token")
    bobs_token = await token_for(server, pki, "bob")
    with pytest.raises(TokenRefused) as mismatch:
        async with connect(server.ws_url, context, bobs_token):
            pass
    assert (mismatch.value.status, mismatch.value.code) == (403, "token_cert_mismatch")
    assert "token_cert_mismatch" in str(mismatch.value)


async def test_unreachable_port(pki: TestPki) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ServerUnreachable, match="connection refused"):
        async with connect(f"wss://127.0.0.1:{port}/ws", pki.client_context("alice"), "t"):
            pass
    with pytest.raises(ServerUnreachable, match="connection refused"):
        await fetch_token(f"https://127.0.0.1:{port}", pki.client_context("alice"))


async def test_server_certificate_from_another_ca(start_server: StartServer, pki: TestPki) -> None:
    server = await start_server(certs_dir=pki.foreign_dir)
    cert, key = pki.client("alice")
    with pytest.raises(TlsFailure, match="not signed by our CA") as failure:
        async with open_chat(server.ws_url, cert, key, pki.ca):
            pass
    assert not failure.value.rejected_by_server
    with pytest.raises(TlsFailure, match="not signed by our CA"):
        async with connect(server.ws_url, pki.client_context("alice"), "t"):
            pass


async def test_client_certificate_rejected_by_server(server: RunningServer, pki: TestPki) -> None:
    with pytest.raises(TlsFailure, match="rejected our client certificate") as failure:
        await fetch_token(server.base_url, pki.foreign_context())
    assert failure.value.rejected_by_server
    with pytest.raises(TlsFailure, match="rejected our client certificate"):
        async with connect(server.ws_url, pki.foreign_context(), "t"):
            pass


# ---------------------------------------------------------------- against the fake server


async def test_several_frames_in_one_message(nursery: trio.Nursery, pki: TestPki) -> None:
    """CONNECTED+MESSAGE, then RECEIPT+MESSAGE+MESSAGE: each batch delivered without more input."""

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        await read_frame(ws, parser)
        await ws.send_message(wire(connected(), message(0, "early")))
        subscribe = await read_frame(ws, parser)
        receipt = Frame("RECEIPT", (("receipt-id", subscribe.require("receipt")),))
        sub_id = subscribe.require("id")
        await ws.send_message(wire(receipt, message(1, sub_id), message(2, sub_id)))
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with connect(url, pki.client_context("alice"), "t", heartbeat=(0, 0)) as client:
        assert (await next_message(client)).subscription == "early"
        sub_id = (await client.subscribe("/topic/lobby")).id
        first, second = await next_message(client), await next_message(client)
    assert [first.text, second.text] == ["msg-1", "msg-2"]
    assert first.subscription == second.subscription == sub_id
    assert (first.sender, first.timestamp) == ("bob", 1700000000000)


async def test_send_waits_for_its_receipt(nursery: trio.Nursery, pki: TestPki) -> None:
    """The fake holds the RECEIPT back until told: send() is still waiting when everything
    else has settled, and returns once the RECEIPT is sent."""
    heard, release, returned = trio.Event(), trio.Event(), trio.Event()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        await read_frame(ws, parser)
        await ws.send_message(wire(connected()))
        send = await read_frame(ws, parser)
        heard.set()
        await release.wait()
        await ws.send_message(wire(Frame("RECEIPT", (("receipt-id", send.require("receipt")),))))
        await answer_receipts(ws, parser)

    async def send(client: StompClient) -> None:
        await client.send("/topic/lobby", "stored?")
        returned.set()

    url = await start_fake(nursery, pki, script)
    async with (
        connect(url, pki.client_context("alice"), "t", heartbeat=(0, 0)) as client,
        trio.open_nursery() as sending,
    ):
        sending.start_soon(send, client)
        with trio.fail_after(FAST):
            await heard.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()
        release.set()
        with trio.fail_after(FAST):
            await returned.wait()


async def test_heartbeats_are_sent_when_idle(nursery: trio.Nursery, pki: TestPki) -> None:
    beats: list[str | bytes] = []
    four = trio.Event()

    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        await read_frame(ws, parser)
        await ws.send_message(wire(connected("0,20")))  # the server wants a beat every 20 ms
        while len(beats) < 4:
            beats.append(await ws.get_message())
        four.set()
        await answer_receipts(ws, parser)

    url = await start_fake(nursery, pki, script)
    async with connect(url, pki.client_context("alice"), "t", heartbeat=(20, 0)) as client:
        assert client.heartbeat == (20, 0)
        with trio.fail_after(FAST):
            await four.wait()  # the client sends nothing else meanwhile
    assert beats == ["\n"] * 4


async def test_error_instead_of_connected(nursery: trio.Nursery, pki: TestPki) -> None:
    async def script(ws: WebSocketConnection, parser: FrameParser) -> None:
        await read_frame(ws, parser)
        await ws.send_message(wire(Frame("ERROR", (("message", "go away"),), b"not today")))
        await ws.aclose(1008)

    url = await start_fake(nursery, pki, script)
    with pytest.raises(StompError) as error:
        async with connect(url, pki.client_context("alice"), "t"):
            pass
    assert (error.value.message, error.value.detail) == ("go away", "not today")


async def test_server_that_does_not_speak_websocket(nursery: trio.Nursery, pki: TestPki) -> None:
    """A 101 answer without Sec-WebSocket-Accept: a clear error, not a wait for the timeout."""
    context = pki_module.server_ssl_context(pki.dir / "server.crt", pki.dir / "server.key", pki.ca)

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        await trio.sleep_forever()

    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    with trio.fail_after(FAST), pytest.raises(BadResponse, match="does not speak WebSocket"):
        async with connect(f"wss://127.0.0.1:{port}/ws", pki.client_context("alice"), "t"):
            pass
