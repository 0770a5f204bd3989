"""An async STOMP 1.2 client over WebSocket over mutual TLS: used by chat-client and chat-load.

How this works: `connect()` opens TLS itself (so a refused certificate is reported as
such), upgrades to WebSocket with trio-websocket offering `v12.stomp` and `bearer.<token>`,
sends CONNECT and waits for CONNECTED, all under one deadline. Then the connection's
nursery owns its tasks: the reader (always reading, so trio-websocket keeps answering
pings; it routes MESSAGE to a bounded channel, RECEIPT to the task waiting for it, ERROR
to the failure), the heart-beat sender and the silence watchdog, and the token renewal
`keep_authorized()` adds. The first failure is sticky: every later call raises it, after
`receive()` has handed out the messages that arrived before it. Leaving the context
sends DISCONNECT, waits (bounded) for its RECEIPT and closes with 1000.
"""

from __future__ import annotations

import itertools
import json
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import trio
import trio_websocket
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, WebSocketConnection

from chat.client.http import (
    WS_SCHEMES,
    BadResponse,
    ClientError,
    ConnectionLost,
    ServerUnreachable,
    ServerUrl,
    TokenGrant,
    WatchedStream,
    open_tls_stream,
    parse_url,
    refusal,
)
from chat.errors import CloseCode, MalformedFrame, StompProtocolError
from chat.stomp import (
    HEARTBEAT,
    SERVER_COMMANDS,
    Frame,
    FrameParser,
    Limits,
    encode,
    negotiate_heartbeat,
    parse_heartbeat,
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
    "sole_exception",
]

STOMP_SUBPROTOCOL = "v12.stomp"  # PROTOCOL.md §2: the only version we speak
BEARER_PREFIX = "bearer."  # PROTOCOL.md §2: the token rides in Sec-WebSocket-Protocol
TOKEN_DESTINATION = "/session/token"  # PROTOCOL.md §7: in-band token renewal
WS_PATH = "/ws"  # PROTOCOL.md §1: where the server serves STOMP
TEXT_PLAIN = "text/plain;charset=utf-8"  # what send() says a str body is
HANDSHAKE_TIMEOUT = 10.0  # TLS + upgrade + CONNECTED: a live server answers in milliseconds
RECEIPT_TIMEOUT = 10.0  # a RECEIPT means "stored"; a server this slow is stuck
CLOSE_TIMEOUT = 2.0  # DISCONNECT's RECEIPT, then the close handshake, when leaving
MAX_UNREAD_MESSAGES = 4096  # received but not yet taken by receive(): beyond, the app is stuck
SILENCE_FACTOR = 2  # PROTOCOL.md §5: silent for over twice the agreed interval means dead
RENEW_AT = 0.75  # renew an access token once this fraction of its lifetime has passed
RENEW_RETRY = 5.0  # seconds between renewal attempts after a failed one
MIN_RENEW_DELAY = 0.5  # never renew in a tight loop, whatever expires_in says
TOKEN_CLOCK_GRAIN = 1.0  # `exp` is whole seconds: a token may end up to 1 s before expires_in
# A server MESSAGE is a SEND (the server's 64 KiB frame limit) plus the headers it adds.
CLIENT_LIMITS = Limits(max_frame_bytes=256 * 1024, max_headers=64)
MAX_WS_MESSAGE = 4 * 1024 * 1024  # many frames may share one WebSocket message

_CLOSE_MEANINGS: dict[int, str] = {  # PROTOCOL.md §6
    CloseCode.NORMAL: "closed by the server",
    CloseCode.GOING_AWAY: "the server is shutting down; reconnect later",
    CloseCode.PROTOCOL_ERROR: "the server reported a protocol error",
    CloseCode.POLICY: "closed by server policy (authorization lost or refused)",
    CloseCode.TOO_BIG: "a message was too big",
    CloseCode.SERVER_ERROR: "the server had an internal error",
}


class StompError(ClientError):
    """The server sent ERROR (`message` header, `detail` body); the connection is over."""

    def __init__(self, message: str, detail: str = "") -> None:
        first_line = detail.strip().splitlines()[0] if detail.strip() else ""
        shown = f"{message}: {first_line}" if first_line and first_line != message else message
        super().__init__(f"the server sent ERROR: {shown}")
        self.message = message
        self.detail = detail

    @classmethod
    def of(cls, frame: Frame) -> StompError:
        return cls(frame.get("message") or "error", frame.body.decode("utf-8", "replace"))


class ServerProtocolError(ConnectionLost):
    """The server sent bytes that are not STOMP 1.2 as PROTOCOL.md describes; we closed 1002."""


class FellBehind(ConnectionLost):
    """More than MAX_UNREAD_MESSAGES were waiting for receive(); we closed rather than grow."""


class ReceiptTimeout(ClientError):
    """No RECEIPT within RECEIPT_TIMEOUT; the frame may or may not have been acted on."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message sits in its topic's history (PROTOCOL.md §8): resume after it."""

    epoch: str  # opaque; a new one means the topic's history was lost
    offset: int  # 1, 2, ... per topic

    @classmethod
    def of(cls, frame: Frame) -> Position | None:
        """A MESSAGE's or RECEIPT's `epoch` and `offset`, or None when it has none."""
        epoch, offset = frame.get("epoch"), frame.get("offset")
        if epoch is None or offset is None:
            return None
        return cls(epoch, _number(offset, "offset"))


@dataclass(frozen=True, slots=True)
class Message:
    """One MESSAGE frame as delivered to a subscription (PROTOCOL.md §4, §8)."""

    destination: str
    subscription: str
    message_id: str
    sender: str
    timestamp: int  # server milliseconds since the epoch
    body: bytes
    headers: tuple[tuple[str, str], ...]
    position: Position | None = None  # None when the server keeps no history
    history: bool = False  # asked for with `last:N` when joining: sent before the join

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @classmethod
    def of(cls, frame: Frame) -> Message:
        return cls(
            frame.require("destination"),
            frame.require("subscription"),
            frame.require("message-id"),
            frame.require("sender"),
            _number(frame.require("timestamp"), "timestamp"),
            frame.body,
            frame.headers,
            Position.of(frame),
        )


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The server's answer to a SUBSCRIBE (its RECEIPT, PROTOCOL.md §8)."""

    id: str
    start: Position | None  # the topic's position as the subscription began (exact topics)
    recovered: bool | None  # for a resume: whether everything after `since` was still there


def _number(value: str, name: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise MalformedFrame(f"MESSAGE {name} {value[:20]!r} is not a number")
    return int(value)


class StompClient:
    """One connected STOMP session, made by `connect()`; its methods may be called from any task.

    `user_name` and `session` come from CONNECTED; `heartbeat` is the negotiated
    (send every ms, expect every ms), 0 meaning none.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        transport: WatchedStream,
        parser: FrameParser,
        connected: Frame,
        offer: tuple[int, int],
    ) -> None:
        self.user_name = connected.get("user-name") or ""
        self.session = connected.get("session") or ""
        self.heartbeat = negotiate_heartbeat(offer, parse_heartbeat(connected.get("heart-beat")))
        self._ws = ws
        self._transport = transport
        self._parser = parser
        self._inbox_in, self._inbox = trio.open_memory_channel[Message](MAX_UNREAD_MESSAGES)
        self._receipts: dict[str, trio.Event] = {}  # receipt id -> set when answered or failed
        self._answers: dict[str, Frame] = {}  # receipt id -> its RECEIPT, until taken
        self._ids = itertools.count(1)
        self._failure: ClientError | None = None
        self._closing = False
        self._disconnected = trio.Event()  # set once disconnect() is done
        self._nursery: trio.Nursery | None = None
        self._routes: dict[str, Callable[[Frame], None]] = {
            "MESSAGE": self._on_message,
            "RECEIPT": self._on_receipt,
            "ERROR": self._on_error,
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
        if answer is None:
            return Subscribed(sub_id, None, None)
        recovered = answer.get("recovered")
        return Subscribed(sub_id, Position.of(answer), None if recovered is None
                          else recovered == "true")

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
                await self._ws.aclose(CloseCode.NORMAL)
        finally:
            self._disconnected.set()

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

    def keep_authorized(
        self, renew: Callable[[], Awaitable[TokenGrant]], expires_in: float
    ) -> None:
        """Renew the access token in-band before it expires, for as long as we are connected.

        `renew` fetches a fresh grant (e.g. POST /auth/refresh); a failed renewal is retried
        until the token runs out, when the server ends the session with ERROR.
        """
        assert self._nursery is not None, "keep_authorized() needs a connected client"
        self._nursery.start_soon(self._keep_authorized, renew, expires_in)

    # ------------------------------------------------------------ frames out

    async def _request(self, frame: Frame, receipt: bool) -> Frame | None:
        """Write `frame`; with `receipt`, wait for its RECEIPT (bounded) or the link's failure."""
        if self._failure is not None:
            raise self._failure
        if not receipt:
            await self._write(frame)
            return None
        receipt_id = f"r-{next(self._ids)}"
        done = self._receipts[receipt_id] = trio.Event()
        try:
            headers = (*frame.headers, ("receipt", receipt_id))
            await self._write(Frame(frame.command, headers, frame.body))
            with trio.move_on_after(RECEIPT_TIMEOUT):
                await done.wait()
        finally:
            self._receipts.pop(receipt_id, None)
            answer = self._answers.pop(receipt_id, None)
        if answer is None:
            raise self._failure or ReceiptTimeout(
                f"no RECEIPT for {frame.command} within {RECEIPT_TIMEOUT:g} s"
            )
        return answer

    async def _write(self, frame: Frame) -> None:
        try:
            await self._ws.send_message(_ws_payload(encode(frame)))
        except ConnectionClosed as exc:
            self._fail(self._closed(exc.reason))
            assert self._failure is not None
            raise self._failure from None

    # ------------------------------------------------------------ background tasks

    def _start(self, nursery: trio.Nursery, early: list[Frame]) -> None:
        self._nursery = nursery
        nursery.start_soon(self._read, early)
        send_ms, expect_ms = self.heartbeat
        if send_ms:
            nursery.start_soon(self._beat, send_ms / 1000)
        if expect_ms:
            nursery.start_soon(self._watch, expect_ms / 1000)

    async def _read(self, early: list[Frame]) -> None:
        """Always reading, whatever the application does, so pings and closes are answered."""
        frames = early
        while True:
            try:
                for frame in frames:
                    self._route(frame)
                frames = self._parser.feed(_bytes(await self._ws.get_message()))
            except ConnectionClosed as exc:
                self._fail(self._closed(exc.reason))
                return
            except StompProtocolError as exc:
                await self._end(ServerProtocolError(f"the server broke STOMP: {exc.message}"),
                                CloseCode.PROTOCOL_ERROR)
                return
            except FellBehind as exc:
                await self._end(exc, CloseCode.POLICY)
                return

    def _route(self, frame: Frame) -> None:
        handler = self._routes.get(frame.command)
        if handler is None:
            raise MalformedFrame(f"unexpected {frame.command} after CONNECTED")
        handler(frame)

    def _on_message(self, frame: Frame) -> None:
        try:
            self._inbox_in.send_nowait(Message.of(frame))
        except trio.WouldBlock:
            raise FellBehind(
                f"closed: over {MAX_UNREAD_MESSAGES} received messages were left unread"
            ) from None
        except trio.ClosedResourceError:
            pass  # already failed (e.g. ERROR): later frames have nowhere to go

    def _on_receipt(self, frame: Frame) -> None:
        receipt_id = frame.require("receipt-id")
        done = self._receipts.pop(receipt_id, None)
        if done is not None:
            self._answers[receipt_id] = frame
            done.set()

    def _on_error(self, frame: Frame) -> None:
        self._fail(StompError.of(frame))  # the server closes next; keep reading until it does

    async def _beat(self, interval: float) -> None:
        """STOMP 1.2 heart-beat: send an EOL when nothing else went out for `interval`."""
        while self._failure is None:
            due = self._transport.last_sent + interval
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            try:
                await self._ws.send_message(HEARTBEAT.decode())
            except ConnectionClosed:
                return  # the reader reports why

    async def _watch(self, interval: float) -> None:
        """Declare the server dead after SILENCE_FACTOR x `interval` without a byte from it."""
        limit = SILENCE_FACTOR * interval
        while self._failure is None:
            deadline = self._transport.last_received + limit
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            silent = trio.current_time() - self._transport.last_received
            await self._end(ConnectionLost(
                f"the server went silent: nothing received for {silent:.1f} s "
                f"(heart-beats were due every {interval:g} s)"
            ), None)

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

    # ------------------------------------------------------------ failure

    def _fail(self, failure: ClientError) -> None:
        """Record the first failure (sticky) and wake everyone waiting on the link."""
        if self._failure is None:
            self._failure = failure
        self._inbox_in.close()
        for done in self._receipts.values():
            done.set()

    async def _end(self, failure: ClientError, code: CloseCode | None) -> None:
        """Fail, then close: with a close frame when the peer is alive, else abruptly."""
        self._fail(failure)
        if code is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose(code)
        await trio.aclose_forcefully(self._transport)

    def _closed(self, reason: CloseReason | None) -> ClientError:
        """Why the WebSocket closed: the transport's precise error when there was no close frame."""
        code = reason.code if reason is not None else None
        if code in (None, 1005, 1006) and self._transport.failure is not None:
            return self._transport.failure
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
    try:
        async with _connection(url, ssl_context, token, heartbeat, host) as client:
            yield client
    except BaseExceptionGroup as group:  # the connection's nursery wraps what the body raised
        leaf = sole_exception(group)
        if leaf is None:
            raise
        raise leaf from leaf.__cause__


@asynccontextmanager
async def _connection(
    url: ServerUrl,
    ssl_context: ssl.SSLContext,
    token: str,
    offer: tuple[int, int],
    host: str | None,
) -> AsyncIterator[StompClient]:
    stream = await open_tls_stream(url.endpoint, ssl_context, HANDSHAKE_TIMEOUT)
    transport = WatchedStream(stream, url.endpoint)
    try:
        async with trio.open_nursery() as nursery:
            client = await _handshake(nursery, transport, url, token, offer, host)
            try:
                yield client
            finally:
                cancelled = trio.current_effective_deadline() == -math.inf
                with trio.CancelScope(shield=True):
                    await client._leave(cancelled)
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(transport)


async def _handshake(
    nursery: trio.Nursery,
    transport: WatchedStream,
    url: ServerUrl,
    token: str,
    offer: tuple[int, int],
    host: str | None,
) -> StompClient:
    """WebSocket upgrade, CONNECT, CONNECTED, under one deadline; starts the client's tasks."""
    parser = FrameParser(CLIENT_LIMITS, commands=SERVER_COMMANDS)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            ws = await _upgrade(nursery, transport, url, token)
            host = host or url.endpoint.host
            connected, early = await _stomp_connect(ws, transport, parser, host, offer)
    except trio.TooSlowError:
        raise ServerUnreachable(
            f"{url.endpoint} did not complete the STOMP handshake within {HANDSHAKE_TIMEOUT:g} s"
        ) from None
    except StompProtocolError as exc:
        raise ServerProtocolError(f"the server broke STOMP: {exc.message}") from None
    client = StompClient(ws, transport, parser, connected, offer)
    client._start(nursery, early)
    return client


class _ReaderHost:
    """Where trio-websocket starts its reader task (it only calls `start_soon`).

    The reader raises when the server refuses the upgrade, and may crash on a malformed
    handshake answer; here that becomes the stream's failure, reported like any other,
    instead of an exception tearing through the connection's nursery.
    """

    def __init__(self, nursery: trio.Nursery, stream: WatchedStream, url: ServerUrl) -> None:
        self._nursery = nursery
        self._stream = stream
        self._url = url

    def start_soon(self, async_fn: Callable[[], Awaitable[object]]) -> None:
        self._nursery.start_soon(self._guarded, async_fn)

    async def _guarded(self, async_fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await async_fn()
            return
        except ConnectionRejected as exc:
            failure = _rejection(exc, self._url)
        except Exception as exc:  # trio-websocket choked on what the server sent
            failure = BadResponse(
                f"{self._url.endpoint} does not speak WebSocket as expected "
                f"({type(exc).__name__}: {exc})"
            )
        self._stream.fail(failure)
        await trio.aclose_forcefully(self._stream)


async def _upgrade(
    nursery: trio.Nursery, transport: WatchedStream, url: ServerUrl, token: str
) -> WebSocketConnection:
    """The WebSocket handshake, raced against the transport breaking.

    trio-websocket waits forever for a handshake whose stream died (TLS 1.3 reports a
    refused client certificate only at the first read; a refused upgrade ends its reader),
    so a broken stream cancels the wait.
    """
    ws: WebSocketConnection | None = None
    host = cast(trio.Nursery, _ReaderHost(nursery, transport, url))
    async with trio.open_nursery() as race:
        race.start_soon(_cancel_when_set, transport.broken, race.cancel_scope)
        ws = await trio_websocket.wrap_client_stream(
            host, transport, url.endpoint.host_header, url.path,
            subprotocols=[STOMP_SUBPROTOCOL, f"{BEARER_PREFIX}{token}"],
            max_message_size=MAX_WS_MESSAGE,
        )
        race.cancel_scope.cancel()
    if ws is None:
        raise transport.failure or BadResponse(f"{url.endpoint} broke off the WebSocket handshake")
    if ws.subprotocol != STOMP_SUBPROTOCOL:  # never named: it could be our bearer entry
        raise BadResponse(f"{url.endpoint} did not select the {STOMP_SUBPROTOCOL} subprotocol")
    return ws


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _stomp_connect(
    ws: WebSocketConnection,
    transport: WatchedStream,
    parser: FrameParser,
    host: str,
    offer: tuple[int, int],
) -> tuple[Frame, list[Frame]]:
    """Send CONNECT; return CONNECTED and any frames that arrived in the same message."""
    connect_frame = Frame("CONNECT", (
        ("accept-version", "1.2"),
        ("host", host),
        ("heart-beat", f"{offer[0]},{offer[1]}"),
    ))
    frames: list[Frame] = []
    try:
        await ws.send_message(encode(connect_frame).decode())
        while not frames:
            frames = parser.feed(_bytes(await ws.get_message()))
    except ConnectionClosed as exc:
        raise transport.failure or ConnectionLost(
            f"the server closed the connection before CONNECTED ({exc.reason})"
        ) from None
    first, early = frames[0], frames[1:]
    if first.command == "ERROR":
        raise StompError.of(first)
    if first.command != "CONNECTED":
        raise MalformedFrame(f"expected CONNECTED, got {first.command}")
    return first, early


def _rejection(exc: ConnectionRejected, url: ServerUrl) -> ClientError:
    """A refused upgrade: TokenRefused with the JSON code (PROTOCOL.md §2's table), or, for
    a path the server does not serve, an error saying so (it has nothing to do with tokens)."""
    if exc.status_code == HTTPStatus.NOT_FOUND:
        return BadResponse(
            f"{url.scheme}://{url.endpoint}{url.path} is not the chat's WebSocket endpoint "
            f"(HTTP 404 for the path {url.path!r}): the path is {WS_PATH}, as in "
            f"{url.scheme}://{url.endpoint}{WS_PATH}"
        )
    try:
        payload = json.loads(exc.body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    return refusal(exc.status_code, payload if isinstance(payload, dict) else {})


def sole_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception a nursery wrapped, if it wrapped exactly one."""
    return group.exceptions[0] if len(group.exceptions) == 1 else None
