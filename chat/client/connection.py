"""An async STOMP 1.2 client over WebSocket over mutual TLS: used by chat-client and chat-load.

How this works: the protocol is a sans-IO `StompConnection` (chat.protocol) in the client
role; this module is its trio shell. `connect()` opens the WebSocket (`websocket.py`:
mutual TLS, trio-websocket, `v12.stomp` and `bearer.<token>` offered as subprotocols),
sends CONNECT and waits for CONNECTED under a deadline. Then the connection's nursery
owns its tasks: the reader (always reading, so trio-websocket keeps answering pings; it
feeds the StompConnection and routes its events: MESSAGE to a bounded channel, RECEIPT to
the task waiting for it, ERROR to the failure), the heart-beat sender and the silence
watchdog (both timed by the StompConnection), and the token renewal `keep_authorized()`
adds. The first failure is sticky: every later call raises it, after `receive()` has
handed out the messages that arrived before it. Leaving the context sends DISCONNECT,
waits (bounded) for its RECEIPT and closes with 1000.
"""

from __future__ import annotations

import itertools
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed

from chat.client.errors import (
    BadResponse,
    ClientError,
    ConnectionLost,
    FellBehind,
    ReceiptTimeout,
    ServerProtocolError,
    ServerUnreachable,
    StompError,
)
from chat.client.http import TokenGrant
from chat.client.messages import Message, Position, Subscribed
from chat.client.tls import WS_SCHEMES, parse_url
from chat.client.websocket import WebSocketLink, open_websocket
from chat.protocol import events, wire
from chat.protocol.connection import SILENCE_FACTOR, ConnectionLimits, Role, StompConnection
from chat.protocol.errors import CloseCode, LocalProtocolError, StompProtocolError
from chat.protocol.stomp import Frame, Limits
from chat.protocol.wire import (
    STOMP_SUBPROTOCOL,
    STOMP_VERSION,
    TEXT_PLAIN,
    TOKEN_DESTINATION,
    bearer_subprotocol,
)

__all__ = [
    "ClientError",
    "ConnectionLost",
    "FellBehind",
    "Message",
    "Position",
    "ReceiptTimeout",
    "ServerProtocolError",
    "StompClient",
    "StompError",
    "Subscribed",
    "connect",
    "stomp_over",
    "TEXT_PLAIN",  # send()'s default content type
]

HANDSHAKE_TIMEOUT = 10.0  # TLS, upgrade, CONNECTED (each): a live server answers in milliseconds
RECEIPT_TIMEOUT = 10.0  # a RECEIPT means "stored"; a server this slow is stuck
CLOSE_TIMEOUT = 2.0  # DISCONNECT's RECEIPT, then the close handshake, when leaving
MAX_UNREAD_MESSAGES = 4096  # received but not yet taken by receive(): beyond, the app is stuck
RENEW_AT = 0.75  # renew an access token once this fraction of its lifetime has passed
RENEW_RETRY = 5.0  # seconds between renewal attempts after a failed one
MIN_RENEW_DELAY = 0.5  # never renew in a tight loop, whatever expires_in says
TOKEN_CLOCK_GRAIN = 1.0  # `exp` is whole seconds: a token may end up to 1 s before expires_in
# A server MESSAGE is a SEND (within the most any server may accept) plus what the server adds.
CLIENT_LIMITS = ConnectionLimits(
    frames=Limits(
        max_frame_bytes=wire.MAX_FRAME_BYTES + wire.MESSAGE_OVERHEAD_BYTES,
        max_headers=wire.MAX_HEADERS + wire.MESSAGE_OVERHEAD_HEADERS,
    )
)

_CLOSE_MEANINGS: dict[int, str] = {  # PROTOCOL.md §6
    CloseCode.NORMAL: "closed by the server",
    CloseCode.GOING_AWAY: "the server is shutting down; reconnect later",
    CloseCode.PROTOCOL_ERROR: "the server reported a protocol error",
    CloseCode.POLICY: "closed by server policy (authorization lost or refused)",
    CloseCode.TOO_BIG: "a message was too big",
    CloseCode.SERVER_ERROR: "the server had an internal error",
}


class StompClient:
    """One connected STOMP session, made by `connect()`; its methods may be called from any task.

    `user_name` and `session` come from CONNECTED; `heartbeat` is the negotiated
    (send every ms, expect every ms), 0 meaning none.
    """

    def __init__(
        self, link: WebSocketLink, protocol: StompConnection, connected: events.Connected
    ) -> None:
        self.user_name = connected.user_name or ""
        self.session = connected.session or ""
        self.heartbeat = connected.heartbeat
        self._link = link
        self._ws = link.ws
        self._protocol = protocol
        self._inbox_in, self._inbox = trio.open_memory_channel[Message](MAX_UNREAD_MESSAGES)
        self._waiting: dict[str, trio.Event] = {}  # receipt id -> set when answered or failed
        self._answers: dict[str, Frame] = {}  # receipt id -> its RECEIPT, until taken
        self._ids = itertools.count(1)
        self._failure: ClientError | None = None
        self._closing = False
        self._disconnected = trio.Event()  # set once disconnect() is done
        self._ended: trio.Event | None = None  # set once _end()'s close is done, if it began
        self._routes: dict[type[events.Event], Callable[[Any], None]] = {
            events.Message: self._on_message,
            events.Receipt: self._on_receipt,
            events.Error: self._on_error,
        }

    # ------------------------------------------------------------ public API

    @property
    def failure(self) -> ClientError | None:
        """Why the link ended (sticky), or None while it is up."""
        return self._failure

    async def subscribe(
        self,
        destination: str,
        *,
        since: Position | None = None,
        last: int = 0,
        receipt: bool = True,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Subscribed:
        """Subscribe (ack:auto); with `receipt`, return once the server says it is active.

        `since`: resume an exact topic after that position, the server replaying what
        followed it (PROTOCOL.md §8). `last`: have the last N retained messages of an exact
        topic first (§11). The answer carries where the subscription starts, so a room in
        which nothing was received yet can still be resumed.
        """
        sub_id = f"sub-{next(self._ids)}"
        own = [("destination", destination), ("id", sub_id), ("ack", "auto")]
        if since is not None:
            own += [("since-offset", str(since.offset)), ("epoch", since.epoch)]
        if last:
            own.append(("last", str(last)))
        answer = await self._request(Frame("SUBSCRIBE", (*own, *headers)), receipt)
        return Subscribed.of(sub_id, answer)

    async def unsubscribe(self, sub_id: str, *, receipt: bool = True) -> None:
        await self._request(Frame("UNSUBSCRIBE", (("id", sub_id),)), receipt)

    async def send(
        self,
        destination: str,
        body: str | bytes,
        *,
        receipt: bool = True,
        content_type: str = TEXT_PLAIN,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """SEND; with `receipt`, return once the server has stored it (PROTOCOL.md §8)."""
        data = body.encode() if isinstance(body, str) else bytes(body)
        own = (
            ("destination", destination),
            ("content-type", content_type),
            ("content-length", str(len(data))),
        )
        await self._request(Frame("SEND", (*own, *headers), data), receipt)

    async def renew(self, token: str) -> None:
        """Extend this connection's authorization with a fresh access token (PROTOCOL.md §7)."""
        await self.send(TOKEN_DESTINATION, token)

    async def receive(self) -> Message:
        """The next MESSAGE; once the link has ended and all are taken, raises why it ended."""
        try:
            return await self._inbox.receive()
        except trio.EndOfChannel:
            assert self._failure is not None  # only _fail() closes the channel
            raise self._failure from None

    def __aiter__(self) -> StompClient:
        return self

    async def __anext__(self) -> Message:
        """Messages until the link ends; ends quietly only after our own disconnect()."""
        try:
            return await self.receive()
        except ConnectionLost:
            if self._closing:
                raise StopAsyncIteration from None
            raise

    async def disconnect(self) -> None:
        """DISCONNECT, wait (bounded) for its RECEIPT, close with 1000. Idempotent: a call
        made while another is under way returns when that one is done (leaving earlier
        would tear the connection down under its close handshake)."""
        if self._closing:
            await self._disconnected.wait()
            return
        self._closing = True
        try:
            if self._failure is None:
                # the link is going away either way: a failure here changes nothing
                with trio.move_on_after(CLOSE_TIMEOUT), suppress(ClientError):
                    await self._request(Frame("DISCONNECT"), receipt=True)
            self._fail(ConnectionLost("disconnected", CloseCode.NORMAL))
            with trio.move_on_after(CLOSE_TIMEOUT):
                if self._ended is not None:  # a close saying why (1002, 1008) is under way
                    await self._ended.wait()
                await self._ws.aclose(CloseCode.NORMAL)
        finally:
            self._disconnected.set()

    def keep_authorized(
        self, renew: Callable[[], Awaitable[TokenGrant]], expires_in: float
    ) -> None:
        """Renew the access token in-band before it expires, for as long as we are connected.

        `renew` fetches a fresh grant (e.g. POST /auth/refresh); a failed renewal is retried
        until the token runs out, when the server ends the session with ERROR.
        """
        self._link.nursery.start_soon(self._keep_authorized, renew, expires_in)

    # ------------------------------------------------------------ frames out

    async def _request(self, frame: Frame, receipt: bool) -> Frame | None:
        """Write `frame`; with `receipt`, wait for its RECEIPT (bounded) or the link's failure."""
        if self._failure is not None:
            raise self._failure
        if self._closing and frame.command != "DISCONNECT":
            raise ConnectionLost("the connection is closing: disconnect() was called")
        if not receipt:
            await self._write(frame)
            return None
        receipt_id = f"r-{next(self._ids)}"
        done = self._waiting[receipt_id] = trio.Event()
        try:
            await self._write(
                Frame(frame.command, (*frame.headers, ("receipt", receipt_id)), frame.body)
            )
            with trio.move_on_after(RECEIPT_TIMEOUT):
                await done.wait()
        finally:
            self._waiting.pop(receipt_id, None)
            answer = self._answers.pop(receipt_id, None)
        if answer is None:
            raise self._failure or ReceiptTimeout(
                f"no RECEIPT for {frame.command} within {RECEIPT_TIMEOUT:g} s"
            )
        return answer

    async def _write(self, frame: Frame) -> None:
        try:
            data = self._protocol.send(frame, trio.current_time())
        except LocalProtocolError as exc:  # ours to fix; the connection cannot go on
            await self._end(
                ConnectionLost(f"closed: cannot send {frame.command}: {exc}"), CloseCode.NORMAL
            )
            raise self._failure or ConnectionLost(str(exc)) from None
        await self._send_message(data)

    async def _send_message(self, data: bytes) -> None:
        try:
            await self._ws.send_message(_ws_payload(data))
        except ConnectionClosed as exc:
            self._fail(self._closed(exc.reason))
            assert self._failure is not None
            raise self._failure from None

    # ------------------------------------------------------------ background tasks

    def _start(self) -> None:
        nursery = self._link.nursery
        nursery.start_soon(self._read)
        if self.heartbeat[0]:
            nursery.start_soon(self._beat)
        if self.heartbeat[1]:
            nursery.start_soon(self._watch)

    async def _read(self) -> None:
        """Always reading, whatever the application does, so pings and closes are answered."""
        while True:
            try:
                while (event := self._protocol.next_event()) is not None:
                    self._routes[type(event)](event)
                data = _bytes(await self._ws.get_message())
            except ConnectionClosed as exc:
                self._fail(self._closed(exc.reason))
                return
            except StompProtocolError as exc:
                await self._end(
                    ServerProtocolError(f"the server broke STOMP: {exc.message}"),
                    CloseCode.PROTOCOL_ERROR,
                )
                return
            except FellBehind as exc:
                await self._end(exc, CloseCode.POLICY)
                return
            self._protocol.receive_data(data, trio.current_time())

    def _on_message(self, event: events.Message) -> None:
        try:
            self._inbox_in.send_nowait(Message.of(event.frame))
        except trio.WouldBlock:
            raise FellBehind(
                f"closed: over {MAX_UNREAD_MESSAGES} received messages were left unread"
            ) from None
        except trio.ClosedResourceError:
            pass  # already failed: later frames have nowhere to go

    def _on_receipt(self, event: events.Receipt) -> None:
        done = self._waiting.pop(event.receipt_id, None)
        if done is not None:  # else its wait timed out
            self._answers[event.receipt_id] = event.frame
            done.set()

    def _on_error(self, event: events.Error) -> None:
        self._fail(StompError.of(event))  # the server closes next; keep reading until it does

    async def _beat(self) -> None:
        """STOMP 1.2 heart-beat: an EOL whenever nothing else went out for the interval."""
        while self._failure is None and not self._closing:
            due = self._protocol.next_heartbeat()
            assert due is not None  # agreed in CONNECTED, and CONNECT went out
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            with suppress(ClientError):  # the reader reports why the link ended
                await self._send_message(self._protocol.send_heartbeat(trio.current_time()))

    async def _watch(self) -> None:
        """Declare the server dead once it has been silent for twice the agreed interval."""
        while self._failure is None:
            deadline = self._protocol.silence_deadline()
            assert deadline is not None  # agreed in CONNECTED, which was heard
            now = trio.current_time()
            if not self._protocol.peer_silent(now):
                await trio.sleep_until(deadline)
                continue
            interval = self.heartbeat[1] / 1000
            silent = now - (deadline - SILENCE_FACTOR * interval)
            await self._end(
                ConnectionLost(
                    f"the server went silent: nothing received for {silent:.1f} s "
                    f"(heart-beats were due every {interval:g} s)"
                ),
                None,
            )

    async def _keep_authorized(
        self, renew: Callable[[], Awaitable[TokenGrant]], expires_in: float
    ) -> None:
        expires_at = trio.current_time() + expires_in - TOKEN_CLOCK_GRAIN
        while self._failure is None:
            await trio.sleep(max(MIN_RENEW_DELAY, RENEW_AT * (expires_at - trio.current_time())))
            try:
                grant = await renew()
                await self.renew(grant.access_token)
            except ClientError:
                if self._failure is not None:
                    return
                await trio.sleep(RENEW_RETRY)  # the server ends the session at expiry anyway
                continue
            expires_at = trio.current_time() + grant.expires_in - TOKEN_CLOCK_GRAIN

    # ------------------------------------------------------------ leaving and failing

    async def _leave(self, cancelled: bool) -> None:
        """Leaving the context: disconnect(), or, when cancelled from outside (our reader is
        cancelled too, so no RECEIPT could be read), a bare DISCONNECT before the close."""
        if not cancelled:
            await self.disconnect()
        elif not self._closing and self._failure is None:
            self._closing = True
            try:
                with trio.move_on_after(CLOSE_TIMEOUT), suppress(ClientError):
                    await self._write(Frame("DISCONNECT"))
            finally:
                self._disconnected.set()

    def _fail(self, failure: ClientError) -> None:
        """Record the first failure (sticky) and wake everyone waiting on the link."""
        if self._failure is None:
            self._failure = failure
        self._inbox_in.close()
        for done in self._waiting.values():
            done.set()

    async def _end(self, failure: ClientError, code: CloseCode | None) -> None:
        """Fail, then close: with a close frame when the peer is alive, else abruptly."""
        self._fail(failure)
        self._ended = ended = trio.Event()
        try:
            if code is not None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._ws.aclose(code)
            await self._link.abort()
        finally:
            ended.set()

    def _closed(self, reason: CloseReason | None) -> ClientError:
        """Why the WebSocket closed: the transport's precise error when there was no close frame."""
        code = reason.code if reason is not None else None
        if code in (None, 1005, 1006) and self._link.broken is not None:
            return self._link.broken
        if code is None:
            return ConnectionLost("the connection closed")
        meaning = _CLOSE_MEANINGS.get(code, "closed by the server")
        said = f": {reason.reason}" if reason is not None and reason.reason else ""
        return ConnectionLost(f"connection closed ({code}, {meaning}{said})", code)


def _ws_payload(data: bytes) -> str | bytes:
    """A text message when the frame is UTF-8 (what stomp.js expects), else binary."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _bytes(message: str | bytes) -> bytes:
    return message.encode("utf-8") if isinstance(message, str) else message


# ---------------------------------------------------------------- opening a connection


@asynccontextmanager
async def connect(
    ws_url: str,
    ssl_context: ssl.SSLContext,
    token: str,
    *,
    heartbeat: tuple[int, int] = (10000, 10000),
    host: str | None = None,
) -> AsyncIterator[StompClient]:
    """A connected StompClient for the duration of the block (see the module docstring).

    `heartbeat` is our offer (can send every ms, want to receive every ms); `host` is the
    CONNECT `host` header (default: the URL's host). Raises `ClientError`s: a refused
    upgrade is `TokenRefused` with the JSON code, an ERROR instead of CONNECTED `StompError`.
    """
    url = parse_url(ws_url, WS_SCHEMES)
    offered = [STOMP_SUBPROTOCOL, bearer_subprotocol(token)]
    async with (
        open_websocket(url, ssl_context, offered, HANDSHAKE_TIMEOUT) as link,
        stomp_over(link, host or url.endpoint.host, heartbeat) as client,
    ):
        yield client


@asynccontextmanager
async def stomp_over(
    link: WebSocketLink, host: str, heartbeat: tuple[int, int]
) -> AsyncIterator[StompClient]:
    """A StompClient on a WebSocket already open (by `connect()`, or a test's memory stream)."""
    client = await _handshake(link, host, heartbeat)
    client._start()
    try:
        yield client
    finally:
        cancelled = trio.current_effective_deadline() == -math.inf
        with trio.CancelScope(shield=True):
            await client._leave(cancelled)


async def _handshake(link: WebSocketLink, host: str, offer: tuple[int, int]) -> StompClient:
    """CONNECT, then CONNECTED (or ERROR), under HANDSHAKE_TIMEOUT."""
    ws = link.ws
    if ws.subprotocol != STOMP_SUBPROTOCOL:  # never named: it could be our bearer entry
        raise BadResponse(f"{link.endpoint} did not select the {STOMP_SUBPROTOCOL} subprotocol")
    protocol = StompConnection(Role.CLIENT, limits=CLIENT_LIMITS)
    connect_frame = Frame(
        "CONNECT",
        (
            ("accept-version", STOMP_VERSION),
            ("host", host),
            ("heart-beat", f"{offer[0]},{offer[1]}"),
        ),
    )
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await ws.send_message(protocol.send(connect_frame, trio.current_time()).decode())
            while (event := protocol.next_event()) is None:
                protocol.receive_data(_bytes(await ws.get_message()), trio.current_time())
    except trio.TooSlowError:
        raise ServerUnreachable(
            f"{link.endpoint} did not complete the STOMP handshake within {HANDSHAKE_TIMEOUT:g} s"
        ) from None
    except ConnectionClosed as exc:
        raise link.broken or ConnectionLost(
            f"the server closed the connection before CONNECTED ({exc.reason})"
        ) from None
    except StompProtocolError as exc:
        raise ServerProtocolError(f"the server broke STOMP: {exc.message}") from None
    if isinstance(event, events.Error):
        raise StompError.of(event)
    assert isinstance(event, events.Connected)  # the state table lets nothing else through
    return StompClient(link, protocol, event)
