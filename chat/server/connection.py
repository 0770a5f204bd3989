"""One accepted WebSocket connection: the trio shell around a `StompConnection` and its
`StompSession`.

How this works: the connection's nursery runs three tasks. The reader feeds wsproto and the
StompConnection (server role: the protocol, chat.protocol), hands each event to the session
(the policy, which never awaits) and sends its answers back through the StompConnection, so
pings and closes are always answered. Only a publisher over its publish rate waits, by design:
the reader waits before acting on its next SEND, reading nothing meanwhile, so TCP flow control
slows it down and nothing is dropped. Fan-out bytes come pre-encoded from the broker straight
into the outbox. The writer drains the `Outbox`, coalescing whatever is pending into one
`send_all`, and after each one lets the session page in more of any replay (so a replay of any
size fits the bounded outbox, PROTOCOL.md §11). The guard sleeps until the next thing due
(connect deadline, our heart-beat, the peer's silence deadline, token expiry), or until the
outbox overflows: an idle connection costs nothing between those. Deadlines only move later
meanwhile (bytes moving, a renewal), so waking at an old one just finds the new one;
revocations and policy changes reach the connection through `check_authorization()`, called by
the server's watchers. Whatever ends the connection records an `Ending` and cancels the
nursery; `run` then performs the close handshake once, under a timeout, so every wait on the
peer is bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
from wsproto import WSConnection
from wsproto.connection import Connection as Framing
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from chat.protocol import events
from chat.protocol.connection import ConnectionLimits, Role, State, StompConnection
from chat.protocol.errors import CloseCode, PolicyViolation, StompProtocolError
from chat.protocol.stomp import Frame, FrameParser
from chat.server.rate import TokenBucket
from chat.server.session import StompSession
from chat.server.storage import StorageUnavailable
from chat.wsframes import data_frame

log = logging.getLogger("chat.server")

RECEIVE_BYTES = 64 * 1024  # one read from the TLS stream
# The longest the guard sleeps: token expiry is wall-clock time, the guard's sleep monotonic,
# so a stepped wall clock delays an expiry by at most this.
GUARD_TICK = 60.0


class StorageFailed(StompProtocolError):
    """The history could not be read to act on a frame: nothing was stored or subscribed."""

    close_code = CloseCode.SERVER_ERROR


class SlowConsumer(PolicyViolation):
    """The peer does not read fast enough: its outbound buffer went over the limit."""


class HeartbeatTimeout(PolicyViolation):
    """Nothing from the peer for more than twice the agreed interval (PROTOCOL.md §5)."""


class ConnectTimeout(PolicyViolation):
    """No STOMP CONNECT within the configured time after the WebSocket opened."""


class CertificateRevoked(PolicyViolation):
    """The CRL the server reloaded lists this connection's client certificate (PROTOCOL.md §12)."""


class Outbox:
    """A bounded (in bytes) outbound buffer; `push` never blocks, overflow is flagged.

    `latency`, when given, receives the seconds from a stamped message's SEND being handled
    to the end of the `send_all` that wrote it (the delivery latency metric).
    """

    def __init__(self, limit: int, latency: Callable[[float], None] | None = None) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self._ready = trio.Event()
        self.overflowed = trio.Event()
        self._closed = False
        self._latency = latency
        self._stamp: float | None = None  # when the oldest stamped message pending was handled
        self._taken: float | None = None  # the same, for the bytes the writer is sending

    @property
    def limit(self) -> int:
        """Unsent bytes beyond this make the connection a slow consumer."""
        return self._limit

    @property
    def pending(self) -> int:
        """Bytes pushed and not yet taken by the writer."""
        return len(self._buffer)

    def push(self, data: bytes) -> None:
        if self._closed:
            return
        self._buffer += data
        if len(self._buffer) > self._limit:
            self._buffer = bytearray()
            self._closed = True
            self.overflowed.set()
        self._ready.set()

    def stamp(self, handled: float) -> None:
        """Time the write of what is pending now from `handled` (`time.perf_counter()`)."""
        if self._stamp is None:
            self._stamp = handled

    async def take(self) -> bytearray:
        """Wait for pending bytes and take all of them; empty once closed and drained."""
        if not self._buffer and not self._closed:
            await self._ready.wait()
        self._ready = trio.Event()
        data, self._buffer = self._buffer, bytearray()
        self._taken, self._stamp = self._stamp, None
        return data

    def sent(self) -> None:
        """The writer wrote what it took: a stamped message's latency is known."""
        if self._taken is not None and self._latency is not None:
            self._latency(time.perf_counter() - self._taken)
        self._taken = None

    def close(self) -> None:
        """No more pushes: the writer flushes what is pending, then stops."""
        self._closed = True
        self._ready.set()


@dataclass(frozen=True, slots=True)
class Ending:
    """Why a connection ends and what the close handshake must send."""

    code: int  # a CloseCode we send, or the code the peer closed with
    reason: str = ""
    error: StompProtocolError | None = None
    receipt_id: str | None = None
    peer_close: CloseConnection | None = None
    broken_framing: bool = False  # the peer broke RFC 6455: its bytes so far are unusable


class Connection:
    """Runs one STOMP-over-WebSocket connection until it ends, then closes it cleanly."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        session: StompSession,
        outbox: Outbox,
        parser: FrameParser,
        connect_timeout: float,
        close_timeout: float,
        *,
        address: str,
        since: float,
        serial: int | None = None,
    ) -> None:
        self.session = session
        self.address = address  # the client's "ip:port", for GET /admin/connections
        self.since = since  # when it opened, by the server's wall clock
        self.serial = serial  # its client certificate's, checked against each new CRL
        self._stream = stream
        self._ws = ws
        self._outbox = outbox
        # the parser carries the configured frame limits; the protocol parses with its own
        self._protocol = StompConnection(Role.SERVER, limits=ConnectionLimits(parser.limits))
        self._connect_deadline = trio.current_time() + connect_timeout
        self._close_timeout = close_timeout
        self._ending: Ending | None = None
        self._connected = trio.Event()
        self._scope: trio.CancelScope | None = None
        session.wake = self._refill  # a replay's page came from disk
        limits = session.limits
        self._publish_rate = (  # SENDs per second, PROTOCOL.md §12; 0: no limit
            TokenBucket(limits.publish_rate, limits.publish_burst, trio.current_time())
            if limits.publish_rate
            else None
        )

    def end(self, ending: Ending) -> None:
        """Stop the connection for `ending`; the first reason wins."""
        if self._ending is None:
            self._ending = ending
        if self._scope is not None:
            self._scope.cancel()

    def fail(self, error: StompProtocolError, receipt_id: str | None = None) -> None:
        self.end(Ending(error.close_code, error.message, error, receipt_id))

    def check_authorization(self) -> None:
        """End the connection if its token expired or was revoked (PROTOCOL.md §7)."""
        try:
            self.session.check_authorization()
        except StompProtocolError as error:
            self.fail(error)

    def check_certificate(self, revoked: frozenset[int]) -> None:
        """End the connection if its client certificate is among the `revoked` serials."""
        if self.serial is not None and self.serial in revoked:
            self.fail(CertificateRevoked("certificate revoked", "the server's CRL lists it"))

    async def run(self, initial: bytes) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                async with trio.open_nursery() as inputs:
                    self._scope = inputs.cancel_scope
                    if self._ending is not None:  # ended before it started (shutdown)
                        inputs.cancel_scope.cancel()
                    inputs.start_soon(self._reader, initial)
                    inputs.start_soon(self._guard)
                # Cancelling a send breaks a TLS stream: let the writer flush what is
                # pending (a RECEIPT before close, say), but only for close_timeout.
                self._outbox.close()
                nursery.cancel_scope.deadline = trio.current_time() + self._close_timeout
        finally:
            self.session.close()
        await self._close(self._ending or Ending(CloseCode.SERVER_ERROR, "connection lost"))

    async def _reader(self, initial: bytes) -> None:
        data = initial
        while True:
            if data:
                self._protocol.data_received(trio.current_time())  # pings count as life too
                self._ws.receive_data(data)
                if await self._handle_events():
                    return
            try:
                data = bytes(await self._stream.receive_some(RECEIVE_BYTES))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.end(Ending(CloseCode.PROTOCOL_ERROR, "peer vanished"))
                return

    async def _handle_events(self) -> bool:
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                done = await self._feed(event.data.encode("utf-8"))
            elif isinstance(event, BytesMessage):
                done = await self._feed(bytes(event.data))
            elif isinstance(event, Ping):
                self._outbox.push(self._ws.send(event.response()))
                done = False
            elif isinstance(event, CloseConnection):
                self.end(self._closed_by_peer(event))
                done = True
            else:
                done = False
            if done:
                return True
        return False

    def _closed_by_peer(self, event: CloseConnection) -> Ending:
        if self._ws.state is ConnectionState.OPEN:
            # No close frame came: wsproto reports the peer's protocol error (bad opcode,
            # unmasked frame, bad UTF-8...) as a close event, with the code and reason to send.
            return Ending(
                event.code, event.reason or "websocket protocol error", broken_framing=True
            )
        return Ending(event.code, "peer closed", peer_close=event)

    async def _feed(self, data: bytes) -> bool:
        """Act on every frame `data` completes; True once the connection is ending."""
        self._protocol.receive_data(data, trio.current_time())
        while True:
            try:
                event = self._protocol.next_event()
            except StompProtocolError as error:
                failed = self._protocol.failed_frame
                self.fail(error, failed.get("receipt") if failed is not None else None)
                return True
            if event is None:
                return False
            if self._publish_rate is not None and isinstance(event, events.Send):
                await self._pace(self._publish_rate)
            try:
                # Its topics into memory first; no checkpoint between this and handle().
                await self.session.durability.loaded(self.session.history_needs(event))
                disconnect = self._act(event)
            except StorageUnavailable as exc:
                self.fail(StorageFailed("storage unavailable", exc.detail), event.receipt)
                return True
            except StompProtocolError as error:
                self.fail(error, event.receipt)
                return True
            if disconnect:
                self.end(Ending(CloseCode.NORMAL, "client disconnected"))
                return True
            if self._protocol.state is State.CONNECTED:
                self._connected.set()

    async def _pace(self, bucket: TokenBucket) -> None:
        """Wait until the publish rate allows one more SEND: meanwhile nothing more is read,
        so TCP flow control slows the peer down; nothing is refused or dropped."""
        now = trio.current_time()
        at = bucket.reserve(now)
        if at > now:
            self._protocol.data_withheld(at)
            await trio.sleep_until(at)

    def _act(self, event: events.Event) -> bool:
        """The session's answer to `event`, sent through the protocol; True: disconnect."""
        acted = self.session.handle(event)
        if acted.reply is not None:
            self._outbox.push(data_frame(self._protocol.send(acted.reply)))
        if event.receipt is not None:
            receipt = Frame("RECEIPT", (("receipt-id", event.receipt), *acted.receipt_headers))
            self.session.receipt(data_frame(self._protocol.send(receipt)), acted.durable_seq)
        if acted.then is not None:
            self.session.then(acted.then)
        return acted.disconnect

    async def _writer(self) -> None:
        while data := await self._outbox.take():
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.end(Ending(CloseCode.PROTOCOL_ERROR, "peer vanished"))
                return
            self._outbox.sent()
            self._protocol.data_sent(trio.current_time())
            self._refill()

    def _refill(self) -> None:
        """The outbox has drained: page in the next chunk of any replay in progress."""
        try:
            self.session.refill()
        except StompProtocolError as error:
            self.fail(error)

    async def _guard(self) -> None:
        with trio.move_on_at(self._connect_deadline):
            await self._connected.wait()
        if not self._connected.is_set():
            self.fail(ConnectTimeout("connect timeout", "no CONNECT frame in time"))
            return
        while True:
            try:
                wake_at = self._check(trio.current_time())
            except StompProtocolError as error:
                self.fail(error)
                return
            with trio.move_on_at(wake_at):
                await self._outbox.overflowed.wait()
                self.fail(SlowConsumer("slow consumer", "outbound buffer limit exceeded"))
                return

    def _check(self, now: float) -> float:
        """Act on what is due at `now`; when the guard must look next."""
        if self._protocol.peer_silent(now):
            expect_ms = self._protocol.heartbeat[1]
            raise HeartbeatTimeout("heart-beat timeout", f"nothing received for {2 * expect_ms} ms")
        due = self._protocol.next_heartbeat()
        if due is not None and now >= due:
            self._outbox.push(data_frame(self._protocol.send_heartbeat(now)))
        self.session.check_authorization()
        return guard_wake(now, self._protocol.next_deadline(now), self.session.expires_in())

    async def _close(self, ending: Ending) -> None:
        """Flush what is pending, send ERROR and the close frame, await the peer's close."""
        data = bytearray()
        if ending.error is not None:
            data += data_frame(self._protocol.send(_error_frame(ending)))
        if self._ws.state is ConnectionState.OPEN:
            data += self._ws.send(CloseConnection(ending.code, ending.reason))
        elif ending.peer_close is not None and self._ws.state is ConnectionState.REMOTE_CLOSING:
            data += self._ws.send(ending.peer_close.response())
        with trio.move_on_after(self._close_timeout):
            try:
                await self._stream.send_all(data)
                if self._ws.state is ConnectionState.LOCAL_CLOSING:
                    # wsproto's parser stays stuck on bad framing: read the answer with a new one
                    ws = Framing(ConnectionType.SERVER) if ending.broken_framing else self._ws
                    await self._await_peer_close(ws)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(self._stream)
        log.info(
            "closed %s (%s): %d %s",
            self.session.id,
            self.session.identity,
            ending.code,
            ending.reason,
            extra={
                "event": "closed",
                "peer": self.address or None,
                "sub": self.session.identity,
                "conn": self.session.id,
                "code": int(ending.code),
                "reason": ending.reason,
            },
        )

    async def _await_peer_close(self, ws: WSConnection | Framing) -> None:
        """Read until the peer answers our close (or breaks the framing again), or leaves."""
        while data := bytes(await self._stream.receive_some(RECEIVE_BYTES)):
            ws.receive_data(data)
            if any(isinstance(event, CloseConnection) for event in ws.events()):
                return


def guard_wake(now: float, heartbeats: float | None, expires_in: float) -> float:
    """When a guard looking at `now` looks next: the heart-beat deadline, the token's expiry
    (`expires_in` seconds away), or GUARD_TICK from now, whichever is first."""
    wake = now + min(expires_in, GUARD_TICK)
    return wake if heartbeats is None else min(wake, heartbeats)


def _error_frame(ending: Ending) -> Frame:
    assert ending.error is not None
    headers = [("message", ending.error.message), ("content-type", "text/plain")]
    if ending.receipt_id is not None:
        headers.append(("receipt-id", ending.receipt_id))
    return Frame("ERROR", tuple(headers), ending.error.detail.encode())
