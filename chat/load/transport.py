"""The two ways a load run talks to a server: STOMP through the client library, or raw.

A `Link` is one open connection as the harness needs it: send a body to its topic,
receive the next body delivered to it. `stomp_link` goes through `chat.client.connection`
(the real client path, with its per-message cost). `raw_link` speaks bare WebSocket
messages through trio-websocket, for `benchmarks/baseline_server.py`, which forwards
every message to every other connection and knows nothing of STOMP or tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Protocol

import trio
import trio_websocket

from chat.client.connection import StompClient, connect
from chat.client.http import ClientError, ConnectionLost
from chat.load.identities import Identity
from chat.stomp import Frame, encode

HEARTBEAT = (0, 0)  # no STOMP heart-beats: a run is short and its traffic proves liveness
RAW_CLOSE_TIMEOUT = 2.0  # raw mode: the WebSocket close handshake when leaving
RAW_CONNECT_TIMEOUT = 10.0  # raw mode: TCP + TLS + upgrade
RAW_MAX_MESSAGE = 1024 * 1024  # raw mode: larger than any --size the harness sends


class Link(Protocol):
    async def send(self, body: bytes) -> None: ...

    async def receive(self) -> bytes: ...


class StompLink:
    """A STOMP connection bound to one destination; sends are fire-and-forget (no receipt)."""

    __slots__ = ("_client", "_destination")

    def __init__(self, client: StompClient, destination: str) -> None:
        self._client = client
        self._destination = destination

    async def send(self, body: bytes) -> None:
        await self._client.send(self._destination, body, receipt=False)

    async def receive(self) -> bytes:
        return (await self._client.receive()).body


@asynccontextmanager
async def stomp_link(
    ws_url: str, identity: Identity, destination: str, *, subscribe: bool
) -> AsyncIterator[StompLink]:
    """A connected (and, for a subscriber, subscribed: receipted) STOMP link."""
    grant = identity.grant
    assert grant is not None, "STOMP links need a token"
    async with connect(ws_url, identity.context, grant.token, heartbeat=HEARTBEAT) as client:
        client.keep_authorized(grant.renew, grant.expires_in)
        if subscribe:
            await client.subscribe(destination, receipt=True)
        yield StompLink(client, destination)


class RawLink:
    """A bare WebSocket connection: text messages out, whatever the server forwards in."""

    __slots__ = ("_ws",)

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def send(self, body: bytes) -> None:
        with _raw_errors():
            await self._ws.send_message(body.decode("ascii"))

    async def receive(self) -> bytes:
        with _raw_errors():
            message = await self._ws.get_message()
        return message.encode("utf-8") if isinstance(message, str) else message


@asynccontextmanager
async def raw_link(ws_url: str, identity: Identity) -> AsyncIterator[RawLink]:
    """An open raw WebSocket over mutual TLS (no token, no subprotocol)."""
    with _raw_errors():
        async with trio_websocket.open_websocket_url(
            ws_url, identity.context, max_message_size=RAW_MAX_MESSAGE,
            connect_timeout=RAW_CONNECT_TIMEOUT, disconnect_timeout=RAW_CLOSE_TIMEOUT,
        ) as ws:
            yield RawLink(ws)


@contextmanager
def _raw_errors() -> Iterator[None]:
    """trio-websocket's and the transport's errors, as the client library's ClientError."""
    try:
        yield
    except trio_websocket.ConnectionClosed as exc:
        raise ConnectionLost(f"connection closed ({exc.reason})") from None
    except trio_websocket.HandshakeError as exc:
        raise ClientError(f"WebSocket handshake failed: {exc!r}") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise ClientError(f"connection failed: {exc!r}") from None


class StalledLink:
    """A subscriber that stops reading once subscribed: it plays the slow consumer.

    trio-websocket's reader holds one unread message and then stops reading the socket,
    so the server's writes back up into its outbound buffer, as with a stalled device.
    """

    __slots__ = ("_ws",)

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def evicted(self, timeout: float) -> bool:
        """Read what is left: True if the server has closed the connection.

        This side never closes, so any close is the eviction: 1008 with an ERROR when the
        close frame got through, 1006 when our full buffers left the server no way to say it.
        """
        with trio.move_on_after(timeout):
            try:
                while True:
                    await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return True
        return False


@asynccontextmanager
async def stalled_link(
    ws_url: str, identity: Identity, destination: str
) -> AsyncIterator[StalledLink]:
    """Connect and subscribe by hand (the client library would never stop reading)."""
    grant = identity.grant
    assert grant is not None, "STOMP links need a token"
    subprotocols = ["v12.stomp", f"bearer.{grant.token}"]
    with _raw_errors():
        async with trio_websocket.open_websocket_url(
            ws_url, identity.context, subprotocols=subprotocols,
            connect_timeout=RAW_CONNECT_TIMEOUT, disconnect_timeout=RAW_CLOSE_TIMEOUT,
        ) as ws:
            for frame in (Frame("CONNECT", (("accept-version", "1.2"), ("host", "chat"))),
                          Frame("SUBSCRIBE", (("destination", destination), ("id", "stalled"),
                                              ("receipt", "subscribed")))):
                await ws.send_message(encode(frame).decode())
                await ws.get_message()  # CONNECTED, then the RECEIPT: subscribed
            yield StalledLink(ws)
