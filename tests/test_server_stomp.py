"""STOMP 1.2 over the real server: routing, stamping, receipts, errors, heart-beats, shutdown.

Heart-beat timing is also checked below TLS on the mock clock (tests/below_tls.py)."""

from __future__ import annotations

import time

import pytest
import trio
from trio_websocket import ConnectionClosed

from chat.protocol.stomp import Frame, encode
from tests.below_tls import BelowTls
from tests.conftest import RunningServer, StompPeer, TestPki, raw_ws, stomp_peer


async def expect_error(peer: StompPeer, message: str, close_code: int) -> Frame:
    frame = await peer.receive()
    assert frame.command == "ERROR"
    assert frame.get("message", "").startswith(message), frame
    assert frame.body  # a human-readable explanation
    with pytest.raises(ConnectionClosed) as info:
        with trio.fail_after(5):
            while True:
                await peer.ws.get_message()
    assert info.value.reason.code == close_code
    return frame


async def test_connected_headers(server: RunningServer, pki: TestPki) -> None:
    async with raw_ws(server, pki, "alice") as ws:
        peer = StompPeer(ws)
        await peer.send(
            "CONNECT",
            {"accept-version": "1.1,1.2", "host": "x", "login": "ignored", "passcode": "ignored"},
        )
        connected = await peer.receive()
    assert connected.command == "CONNECTED"
    assert connected.get("version") == "1.2"
    assert connected.get("user-name") == "alice"
    assert connected.get("heart-beat") == "10000,10000"
    assert connected.get("session") and connected.get("server")


async def test_stomp_command_also_connects(server: RunningServer, pki: TestPki) -> None:
    async with raw_ws(server, pki, "alice") as ws:
        peer = StompPeer(ws)
        await peer.send("STOMP", {"accept-version": "1.2", "host": "x"})
        assert (await peer.receive()).command == "CONNECTED"


async def test_message_fields_and_sender_stamping(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "bob") as bob, stomp_peer(server, pki, "alice") as alice:
        await bob.send("SUBSCRIBE", {"destination": "/topic/lobby", "id": "s1", "receipt": "r1"})
        assert (await bob.receive()).get("receipt-id") == "r1"
        before = time.time() * 1000
        await alice.send(
            "SEND",
            {
                "destination": "/topic/lobby",
                "sender": "mallory",
                "timestamp": "1",
                "x-custom": "kept",
            },
            b"hello",
        )
        message = await bob.receive()
    assert message.command == "MESSAGE"
    assert message.body == b"hello"
    assert message.get("sender") == "alice"
    assert before - 1000 <= int(message.get("timestamp")) <= time.time() * 1000 + 1000
    assert message.get("destination") == "/topic/lobby"
    assert message.get("subscription") == "s1"
    assert message.get("content-length") == "5"
    assert message.get("content-type") == "text/plain;charset=utf-8"
    assert message.get("message-id")
    assert message.get("x-custom") == "kept"
    assert [v for k, v in message.headers if k == "sender"] == ["alice"]


async def test_body_with_nul_bytes_round_trips(server: RunningServer, pki: TestPki) -> None:
    body = b"a\x00b\xff\x00"
    async with stomp_peer(server, pki, "bob") as bob:
        await bob.send("SUBSCRIBE", {"destination": "/topic/bin", "id": "0", "receipt": "r"})
        await bob.receive()
        await bob.send(
            "SEND",
            {
                "destination": "/topic/bin",
                "content-length": str(len(body)),
                "content-type": "application/octet-stream",
            },
            body,
        )
        message = await bob.receive()
    assert message.body == body


PATTERNS = {
    "exact": "/topic/chat.dev",
    "star": "/topic/chat.*",
    "hash": "/topic/chat.#",
    "all": "/topic/#",
    "deep_star": "/topic/*.dev.*",
}
ROUTING = [
    ("/topic/chat.dev", {"exact", "star", "hash", "all"}),
    ("/topic/chat", {"hash", "all"}),
    ("/topic/chat.dev.backend", {"hash", "all", "deep_star"}),
    ("/topic/other", {"all"}),
]


async def test_wildcard_routing(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "bob") as bob, stomp_peer(server, pki, "alice") as alice:
        for sub_id, pattern in PATTERNS.items():
            await bob.send("SUBSCRIBE", {"destination": pattern, "id": sub_id})
        for n, (destination, expected) in enumerate(ROUTING):
            await alice.send("SEND", {"destination": destination, "receipt": "sent"}, b"x")
            assert (await alice.receive()).command == "RECEIPT"
            # alice's receipt means bob's copies are queued: bob's own receipt comes after them
            await bob.send(
                "SUBSCRIBE", {"destination": f"/topic/fence{n}", "id": f"f{n}", "receipt": "fence"}
            )
            got = set()
            while (frame := await bob.receive()).command == "MESSAGE":
                assert frame.get("destination") == destination
                got.add(frame.get("subscription"))
            assert frame.get("receipt-id") == "fence"
            assert got == expected, destination


async def test_unsubscribe_stops_delivery(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "bob") as bob:
        await bob.send("SUBSCRIBE", {"destination": "/topic/a", "id": "1"})
        await bob.send("UNSUBSCRIBE", {"id": "1"})
        await bob.send("SEND", {"destination": "/topic/a"}, b"gone")
        await bob.send("SEND", {"destination": "/topic/fence", "receipt": "f"})
        assert (await bob.receive()).command == "RECEIPT"


async def test_several_frames_in_one_websocket_message(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "bob") as bob:
        frames = [
            Frame("SUBSCRIBE", (("destination", "/topic/multi"), ("id", "m"))),
            Frame("SEND", (("destination", "/topic/multi"),), b"one"),
            Frame("SEND", (("destination", "/topic/multi"), ("receipt", "two")), b"two"),
        ]
        await bob.ws.send_message(b"".join(encode(f) for f in frames) + b"\n\n")
        received = [await bob.receive() for _ in range(3)]
    assert [f.command for f in received] == ["MESSAGE", "MESSAGE", "RECEIPT"]
    assert [f.body for f in received[:2]] == [b"one", b"two"]


async def test_disconnect_receipt_then_close_1000(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send("DISCONNECT", {"receipt": "bye"})
        assert (await alice.receive()).get("receipt-id") == "bye"
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            await alice.ws.get_message()
    assert info.value.reason.code == 1000


@pytest.mark.parametrize(
    ("command", "headers", "message", "code"),
    [
        ("FROB", {}, "unknown command", 1002),
        ("SEND", {"destination": "/queue/x"}, "invalid destination", 1008),
        ("SEND", {"destination": "/topic/a.*"}, "invalid destination", 1008),
        ("SUBSCRIBE", {"destination": "/topic/a..b", "id": "1"}, "invalid destination", 1008),
        ("SUBSCRIBE", {"destination": "/topic/a"}, "missing header 'id'", 1002),
        ("SEND", {}, "missing header 'destination'", 1002),
        ("BEGIN", {"transaction": "t"}, "BEGIN not supported", 1008),
        (
            "SUBSCRIBE",
            {"destination": "/topic/a", "id": "1", "ack": "client"},
            "unsupported ack mode",
            1008,
        ),
    ],
)
async def test_bad_frames_get_error_and_close(server, pki, command, headers, message, code) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send(command, headers)
        frame = await alice.receive()
        assert frame.command == "ERROR", frame
        assert frame.get("message", "").startswith(message.split(" '")[0]), frame
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:
                await alice.ws.get_message()
        assert info.value.reason.code == code


async def test_error_carries_receipt_id_of_failed_frame(server, pki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send("SEND", {"destination": "/queue/no", "receipt": "77"})
        frame = await expect_error(alice, "invalid destination", 1008)
    assert frame.get("receipt-id") == "77"


async def test_frame_before_connect(server: RunningServer, pki: TestPki) -> None:
    async with raw_ws(server, pki, "alice") as ws:
        peer = StompPeer(ws)
        await peer.send("SEND", {"destination": "/topic/a"}, b"x")
        await expect_error(peer, "not connected", 1008)


async def test_frame_too_large_closes_1009(start_server, pki: TestPki) -> None:
    server = await start_server(max_frame_bytes=1024)
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send("SEND", {"destination": "/topic/a"}, b"x" * 2000)
        await expect_error(alice, "frame exceeds 1024 bytes", 1009)


async def test_too_many_headers(start_server, pki: TestPki) -> None:
    server = await start_server(max_headers=4)
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send("SEND", {f"h{i}": "v" for i in range(10)} | {"destination": "/topic/a"})
        assert (await alice.receive()).command == "ERROR"


async def test_subscription_limit(start_server, pki: TestPki) -> None:
    server = await start_server(max_subscriptions=2)
    async with stomp_peer(server, pki, "alice") as alice:
        for i in range(3):
            await alice.send("SUBSCRIBE", {"destination": f"/topic/t{i}", "id": str(i)})
        await expect_error(alice, "too many subscriptions", 1008)


async def test_bad_frame_does_not_disturb_others(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "bob") as bob, stomp_peer(server, pki, "alice") as alice:
        await bob.send("SUBSCRIBE", {"destination": "/topic/calm", "id": "c", "receipt": "r"})
        await bob.receive()
        async with stomp_peer(server, pki, "carol") as carol:
            await carol.ws.send_message(b"GARBAGE\n\n\x00")
            assert (await carol.receive()).command == "ERROR"
        await alice.send("SEND", {"destination": "/topic/calm"}, b"still here")
        assert (await bob.receive()).body == b"still here"


async def test_silent_peer_is_closed_after_twice_the_interval(start_server, pki) -> None:
    server = await start_server(heartbeat=(100, 100))
    async with stomp_peer(server, pki, "alice", heartbeat="100,0") as alice:
        start = trio.current_time()
        with pytest.raises(ConnectionClosed), trio.fail_after(5):
            while True:
                frame = await alice.receive()
                assert frame.command == "ERROR"
                assert frame.get("message") == "heart-beat timeout"
        assert trio.current_time() - start >= 0.2


async def test_silent_peer_is_closed_on_the_clock(start_below_tls, autojump_clock) -> None:
    """Below TLS, on the mock clock: beats due every 10 s, closed once 20 s pass in silence
    (the guard wakes when the deadline falls due); the server beat at 10 s meanwhile."""
    below: BelowTls = await start_below_tls(heartbeat=(10000, 10000))
    async with below.stomp_peer("alice", heartbeat="10000,10000") as alice:
        start = trio.current_time()
        beats: list[float] = []
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(60):
            while True:
                message = await alice.ws.get_message()
                if message == "\n":
                    beats.append(trio.current_time() - start)
                else:
                    assert "heart-beat timeout" in str(message)
        assert trio.current_time() - start == pytest.approx(20, abs=0.01)
    assert info.value.reason.code == 1008
    assert beats == [pytest.approx(10, abs=0.01)]


async def test_peer_sending_heartbeats_stays_connected(start_below_tls, autojump_clock) -> None:
    below: BelowTls = await start_below_tls(heartbeat=(100, 100))
    async with below.stomp_peer("alice", heartbeat="100,100") as alice:
        received = 0
        with trio.move_on_after(10):
            while True:
                await alice.ws.send_message("\n")
                with trio.move_on_after(0.05):
                    message = await alice.ws.get_message()
                    assert message == "\n"  # the server's own heart-beats
                    received += 1
        await alice.send("SEND", {"destination": "/topic/x", "receipt": "alive"})
        assert (await alice.receive()).get("receipt-id") == "alive"
    assert received >= 10 / 0.15  # one every 100 to 150 ms: the guard looks every 50 ms


async def test_websocket_ping_gets_pong(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        with trio.fail_after(5):
            await alice.ws.ping(b"are you there")


async def test_shutdown_closes_with_1001(server: RunningServer, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        server.server.shutdown()
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:
                await alice.ws.get_message()
    assert info.value.reason.code == 1001
