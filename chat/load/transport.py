"""The two ways a load run talks to a server: STOMP through the client library, or raw.

A link is one open connection as the harness needs it: a `Sender` sends bodies to its
topic, a `Receiver` takes the next body delivered to it. The STOMP links are the client library's
`ResilientSession`, so a run across a server restart goes through the same reconnect,
resume-by-offset and dedupe as `chat-client`: a subscriber resubscribes from the last
offset it received, and checks every delivery against the offsets it already has (the
session should never repeat one: `duplicates` says whether it did). A publisher asks
for a RECEIPT per SEND, awaited in a task of its own so receipts overlap; each answer,
or the link dying first, is reported to the run. `raw_link` speaks bare WebSocket
messages through trio-websocket, for `benchmarks/baseline_server.py`, which forwards
every message to every other connection and knows nothing of STOMP or tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Protocol

import trio
import trio_websocket

from chat.client.backoff import Backoff
from chat.client.errors import ClientError, ConnectionLost
from chat.client.messages import Message
from chat.client.resilient import (
    Online,
    Reconnecting,
    Recovered,
    Resilience,
    ResilientSession,
    connect_resilient,
)
from chat.load.identities import Identity
from chat.load.stats import Positions, SubscriberCount
from chat.protocol.stomp import Frame, encode
from chat.protocol.wire import STOMP_SUBPROTOCOL, bearer_subprotocol

HEARTBEAT = (0, 0)  # no STOMP heart-beats: a run is short and its traffic proves liveness
# Reconnect soon after a restart (a run lasts seconds), full jitter spreads the herd; a send
# waits for the link this long before it counts as unconfirmed; failing at setup is final.
LOAD_RESILIENCE = Resilience(
    backoff=Backoff(base=0.1, cap=2.0), send_timeout=10.0, start_attempts=1
)
# How often setup checks that the first SUBSCRIBE went through (nothing is missed meanwhile:
# publishers start only once every link is set up).
SUBSCRIBED_POLL = 0.01
RAW_CLOSE_TIMEOUT = 2.0  # raw mode: the WebSocket close handshake when leaving
RAW_CONNECT_TIMEOUT = 10.0  # raw mode: TCP + TLS + upgrade
RAW_MAX_MESSAGE = 1024 * 1024  # raw mode: larger than any --size the harness sends

Outcome = Callable[[bytes, bool], None]  # (body, confirmed): a publisher's RECEIPT or its loss


class Sender(Protocol):
    @property
    def online(self) -> bool: ...

    @property
    def reconnects(self) -> int: ...

    async def send(self, body: bytes) -> None: ...


class Receiver(Protocol):
    @property
    def online(self) -> bool: ...

    async def receive(self) -> bytes: ...


class StompSubscriber:
    """A resilient session subscribed to one destination: bodies in, each offset once."""

    __slots__ = ("_session", "_count", "_positions")

    def __init__(self, session: ResilientSession, count: SubscriberCount) -> None:
        self._session = session
        self._count = count
        self._positions = Positions()

    @property
    def online(self) -> bool:
        return self._session.online

    async def receive(self) -> bytes:
        """The next body not received before; counts reconnects and copies on the way."""
        count, first_time = self._count, self._positions.first_time
        while True:
            event = await self._session.receive()
            if type(event) is Message:
                position = event.position
                if position is None or first_time(
                    event.destination, position.epoch, position.offset
                ):
                    return event.body
                count.duplicates += 1
            elif isinstance(event, Online) and not event.first:
                count.reconnects += 1
            elif isinstance(event, Recovered) and not event.ok:
                count.unrecovered += 1


@asynccontextmanager
async def stomp_subscriber(
    ws_url: str, identity: Identity, destination: str, count: SubscriberCount
) -> AsyncIterator[StompSubscriber]:
    """A resilient session, subscribed (the server has answered) to `destination`."""
    async with _session(ws_url, identity) as session:
        await session.subscribe(destination)
        while not session.online:  # subscribe() returns at once while the first link settles
            with trio.move_on_after(SUBSCRIBED_POLL):
                event = await session.receive()  # raises why the session ended, if it did
                if isinstance(event, Reconnecting):  # setup failures are final, as ever
                    raise ConnectionLost(f"the link died while subscribing: {event.reason}")
        yield StompSubscriber(session, count)


class StompPublisher:
    """A resilient session publishing to one destination, every SEND receipted.

    `send()` hands the body to a task that waits for its RECEIPT and reports the outcome,
    so the publisher goes on while the server commits. A send the session could not
    confirm (`NotDelivered`) is never resent, as in `chat-client`.
    """

    __slots__ = ("_session", "_destination", "_nursery", "_outcome", "reconnects", "_failure")

    def __init__(
        self, session: ResilientSession, destination: str, nursery: trio.Nursery, outcome: Outcome
    ) -> None:
        self._session = session
        self._destination = destination
        self._nursery = nursery
        self._outcome = outcome
        self.reconnects = 0
        self._failure: ClientError | None = None

    @property
    def online(self) -> bool:
        return self._session.online

    async def send(self, body: bytes) -> None:
        """Start sending `body`; raises once the session has failed for good."""
        if self._failure is not None:
            raise self._failure
        self._nursery.start_soon(self._send, body)
        await trio.lowlevel.checkpoint()

    async def _send(self, body: bytes) -> None:
        try:
            await self._session.send(self._destination, body, receipt=True)
        except ClientError:  # NotDelivered, or the failure that ended the session
            self._outcome(body, False)
            return
        self._outcome(body, True)

    async def watch(self) -> None:
        """Take the session's events (it waits when they pile up): count reconnects, and
        note a failure no reconnect can cure."""
        try:
            async for event in self._session:
                if isinstance(event, Online) and not event.first:
                    self.reconnects += 1
        except ClientError as exc:
            self._failure = exc


@asynccontextmanager
async def stomp_publisher(
    ws_url: str, identity: Identity, destination: str, outcome: Outcome
) -> AsyncIterator[StompPublisher]:
    """A resilient publishing session; sends still unanswered are cut off when it closes."""
    async with _session(ws_url, identity) as session, trio.open_nursery() as nursery:
        publisher = StompPublisher(session, destination, nursery, outcome)
        nursery.start_soon(publisher.watch)
        yield publisher
        nursery.cancel_scope.cancel()


def _session(ws_url: str, identity: Identity) -> AbstractAsyncContextManager[ResilientSession]:
    tokens = identity.tokens
    assert tokens is not None, "STOMP links need tokens"
    return connect_resilient(
        ws_url, identity.context, tokens, heartbeat=HEARTBEAT, resilience=LOAD_RESILIENCE
    )


class RawLink:
    """A bare WebSocket connection: text messages out, whatever the server forwards in."""

    __slots__ = ("_ws",)
    online = True  # while it exists: a raw link does not come back once lost
    reconnects = 0

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
            ws_url,
            identity.context,
            max_message_size=RAW_MAX_MESSAGE,
            connect_timeout=RAW_CONNECT_TIMEOUT,
            disconnect_timeout=RAW_CLOSE_TIMEOUT,
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
    tokens = identity.tokens
    assert tokens is not None, "STOMP links need tokens"
    grant = await tokens.grant()
    subprotocols = [STOMP_SUBPROTOCOL, bearer_subprotocol(grant.access_token)]
    with _raw_errors():
        async with trio_websocket.open_websocket_url(
            ws_url,
            identity.context,
            subprotocols=subprotocols,
            connect_timeout=RAW_CONNECT_TIMEOUT,
            disconnect_timeout=RAW_CLOSE_TIMEOUT,
        ) as ws:
            for frame in (
                Frame("CONNECT", (("accept-version", "1.2"), ("host", "chat"))),
                Frame(
                    "SUBSCRIBE",
                    (("destination", destination), ("id", "stalled"), ("receipt", "subscribed")),
                ),
            ):
                await ws.send_message(encode(frame).decode())
                await ws.get_message()  # CONNECTED, then the RECEIPT: subscribed
            yield StalledLink(ws)
