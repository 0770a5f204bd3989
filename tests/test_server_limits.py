"""Bounds on what one peer can do (issue 11): a broken WebSocket is named and closed at once,
the guard sleeps until something is due, a fast publisher is slowed and never dropped.

Connection-level cases run below TLS on the mock clock (tests/below_tls.py); the peer speaks
raw WebSocket through a client-side wsproto so it can break the framing on purpose.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.frame_protocol import CloseReason

from tests.below_tls import BelowTls


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
