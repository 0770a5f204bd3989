"""A chat session that outlives its connections: reconnect, resubscribe, resume, exactly once.

How this works: a supervisor task owns the current link (a `StompClient` from
`connect_authorized()`, so every link starts with a fresh token). While a link is up, a
pump task moves its messages to the session's one event channel, skipping any already
delivered: each MESSAGE carries its topic's `epoch` and `offset` (PROTOCOL.md §8), and the
session remembers the last position it delivered per topic. When the link dies (a close,
1001 when the server shuts down; an ERROR such as `slow consumer`; silence past the
heart-beat deadline), the supervisor emits `Reconnecting`, sleeps a full-jitter backoff,
connects again, emits `Online` and resubscribes every room: an exact topic from its last
position (`since-offset`, `epoch`), so the server replays what was missed, each room then
reported by `Recovered`. Rooms with a position are resubscribed first, so that no live
copy arriving through a wildcard room can overtake their replay. An inbox (`/user/NAME`)
resumes exactly like a room; a presence subscription (`/presence/ROOM`) is no history: it is
made afresh and its new snapshot says who is there now. A room the server refuses on
resubscribing (the policy changed, PROTOCOL.md §9) is dropped and reported by `Refused`:
the refusal closed the link, and the next one goes on without it.

A room's position is the last message delivered from it or, before any, where its
subscription began (the SUBSCRIBE's RECEIPT carries `epoch` and `offset`): so a quiet room
resumes too. While a SUBSCRIBE awaits its RECEIPT, the pump holds back that room's
messages, so each is judged against what the RECEIPT said (new epoch, history or live).

Sends are never resent once a link died under them: see `ResilientSession.send()`. The
application must keep taking events; a full channel makes the session wait for it.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from chat.client.auth import (
    Notice,
    TokenSource,
    connect_authorized,
    gave_up,
    server_urls,
    token_store,
)
from chat.client.backoff import DEFAULT_BACKOFF, Backoff
from chat.client.connection import CLOSE_TIMEOUT, StompClient
from chat.client.errors import (
    ClientError,
    ConnectionLost,
    ReceiptTimeout,
    ServerBusy,
    ServerUnreachable,
    SilentRefusal,
    StompError,
    sole_exception,
)
from chat.client.http import TokenGrant
from chat.client.messages import Message, Position, Subscribed
from chat.client.rights import Rights, fetch_rights
from chat.pki import client_ssl_context
from chat.protocol.topics import PRESENCE_PREFIX
from chat.protocol.wire import TEXT_PLAIN

__all__ = [
    "Event",
    "NotDelivered",
    "Online",
    "Reconnecting",
    "Recovered",
    "Refused",
    "Resilience",
    "ResilientSession",
    "connect_resilient",
    "open_session",
]

log = logging.getLogger("chat.client")

SEND_TIMEOUT = 30.0  # send() while offline waits this long for the link to come back
START_ATTEMPTS = 4  # an unreachable server at start is tried this often, then reported
STABLE_LINK = 10.0  # a link that stayed up this long ends a bad spell: backoff starts over
MAX_UNREAD_EVENTS = 4096  # events not yet taken by the application; beyond, the session waits
FORBIDDEN = "forbidden"  # PROTOCOL.md §9: the ERROR `message` of a SUBSCRIBE the policy refuses

# What a new connection may cure once the session has been online: a server restarting,
# shutting down or shedding load. Anything else (a refused token or certificate, a server
# we do not trust) would fail the same way again, so it ends the session.
_TRANSIENT: tuple[type[ClientError], ...] = (
    ServerUnreachable,
    ServerBusy,
    ConnectionLost,
    StompError,
    ReceiptTimeout,
    SilentRefusal,
)


@dataclass(frozen=True, slots=True)
class Online:
    """Connected (`first`: the session's first link); rooms are being resubscribed."""

    session: str
    first: bool


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The link is down: try number `attempt` comes in `delay` seconds."""

    attempt: int
    delay: float
    reason: str  # why the link died, or why the previous try failed


@dataclass(frozen=True, slots=True)
class Recovered:
    """A room resubscribed after a reconnect. `ok` is False when messages sent meanwhile may
    be missing: the history was lost or expired, or the room is a wildcard (not resumable).
    It comes once the server answered the SUBSCRIBE, possibly before the last replayed
    messages are taken."""

    destination: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """A room the server no longer lets us subscribe to (its policy changed): dropped."""

    destination: str
    reason: str


Event = Message | Online | Reconnecting | Recovered | Refused


class NotDelivered(ClientError):
    """A send the server did not confirm. It is never resent by the session.

    `maybe_delivered`: the frame went out before the link died, so the server may have
    published it and resending could duplicate it; the caller decides. False: it never
    left (the link did not come back within the send timeout).
    """

    def __init__(self, message: str, *, maybe_delivered: bool) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


@dataclass(frozen=True, slots=True)
class Resilience:
    """How hard a session tries: reconnect delays, send wait, tries at start."""

    backoff: Backoff = DEFAULT_BACKOFF
    send_timeout: float = SEND_TIMEOUT
    start_attempts: int = START_ATTEMPTS


DEFAULT_RESILIENCE = Resilience()


@dataclass(eq=False, slots=True)
class _Link:
    """One live connection and what is subscribed on it (owned by the supervisor)."""

    client: StompClient
    subs: dict[str, str] = field(default_factory=dict)  # destination -> subscription id
    left: set[str] = field(default_factory=set)  # ids unsubscribed: late messages are dropped
    ready: bool = False  # every room resubscribed: sends may go
    joining: dict[str, trio.Event] = field(default_factory=dict)  # set once the RECEIPT is in
    history: dict[str, Position] = field(default_factory=dict)  # `last:N` joins: up to here
    rights: Rights | None = None  # GET /auth/me, asked once per link


class ResilientSession:
    """A chat session across reconnects, made by `connect_resilient()` or `open_session()`.

    Iterate it for `Event`s; `subscribe`, `unsubscribe` and `send` may be called from any
    task. `user_name` and `session` come from the latest CONNECTED. A failure no reconnect
    can cure (a refused certificate or token) ends the iteration and every later call.
    """

    def __init__(
        self,
        ws_url: str,
        ssl_context: ssl.SSLContext,
        tokens: TokenSource,
        heartbeat: tuple[int, int],
        resilience: Resilience,
    ) -> None:
        self.user_name = ""
        self.session = ""
        self._ws_url = ws_url
        self._ssl_context = ssl_context
        self._tokens = tokens
        self._heartbeat = heartbeat
        self._resilience = resilience
        self._rooms: dict[str, bool] = {}  # destination -> active on some link yet, join order
        self._backlog: dict[str, int] = {}  # destination -> `last:N` asked for on joining
        self._positions: dict[str, Position] = {}  # topic -> last delivered
        self._starts: dict[str, Position] = {}  # room -> where its subscription began
        self._link: _Link | None = None
        self._started = False
        self._closing = False
        self._failure: ClientError | None = None
        self._changed = trio.Event()  # set and replaced whenever the link's state changes
        self._events_in, self._events = trio.open_memory_channel[Event](MAX_UNREAD_EVENTS)

    # ------------------------------------------------------------ public API

    @property
    def rooms(self) -> tuple[str, ...]:
        """The destinations subscribed, in the order joined."""
        return tuple(self._rooms)

    @property
    def online(self) -> bool:
        link = self._link
        return link is not None and link.ready and link.client.failure is None

    async def subscribe(self, destination: str, *, last: int = 0) -> None:
        """Join a room, kept across reconnects; returns once active, or at once while
        offline (it is subscribed when the link is back). A room the server refuses is
        forgotten and its `StompError` raised.

        `last` (exact rooms): the room's last N messages come first, marked `history`.
        """
        self._check()
        if destination in self._rooms:
            return
        self._rooms[destination] = False
        self._backlog[destination] = last
        self._forget(destination)  # resume only from what this join delivers
        link = self._link
        if link is None or not link.ready:
            return  # the resubscription under way or the next one takes it
        try:
            await self._join(link, destination)
        except ClientError as exc:
            if isinstance(exc, StompError) or link.client.failure is None:
                self._rooms.pop(destination, None)
                raise
            # the link died: the reconnect subscribes it

    async def rights(self, *, fresh: bool = False) -> Rights:
        """What our identity may do (GET /auth/me), asked once per connection, or again
        when `fresh`: the policy can change live (and a change that ends a subscription
        ends the connection too). Raises `ConnectionLost` while offline rather than wait."""
        link = self._link
        if link is None or link.client.failure is not None:
            raise ConnectionLost("not connected: cannot ask the server what we may do")
        if link.rights is None or fresh:
            link.rights = await fetch_rights(
                self._tokens.base_url, self._ssl_context, dial=self._tokens.dial
            )
        return link.rights

    async def unsubscribe(self, destination: str) -> None:
        """Leave a room (a no-op for a room not joined)."""
        if destination not in self._rooms:
            return
        del self._rooms[destination]
        self._forget(destination)
        link = self._link
        if link is not None:
            await self._leave(link, destination)

    async def send(
        self,
        destination: str,
        body: str | bytes,
        *,
        receipt: bool = True,
        content_type: str = TEXT_PLAIN,
        headers: Sequence[tuple[str, str]] = (),
        queued_at: float | None = None,
    ) -> None:
        """SEND once the link is up (waiting up to the send timeout); with `receipt`, return
        only when the server confirmed it (stored, PROTOCOL.md §8).

        `queued_at` (trio time, default now): when the caller queued it; the send timeout
        counts from then, so lines queued together while offline give up together.
        Raises `NotDelivered` when the link died before the confirmation: never resent,
        since the server may have published it; `maybe_delivered` says whether it left.
        """
        client = await self._ready_client(queued_at)
        try:
            await client.send(
                destination, body, receipt=receipt, content_type=content_type, headers=headers
            )
        except ClientError as exc:
            raise NotDelivered(
                f"the server did not confirm it ({exc}); it may or may not have arrived "
                "and was not resent",
                maybe_delivered=True,
            ) from exc

    async def receive(self) -> Event:
        """The next event; raises the session's failure, or ConnectionLost once closed."""
        try:
            return await self._events.receive()
        except trio.EndOfChannel:
            raise self._failure or ConnectionLost("the session is closed") from None

    def __aiter__(self) -> ResilientSession:
        return self

    async def __anext__(self) -> Event:
        """Events until the session is closed (quietly) or fails (raised)."""
        try:
            return await self._events.receive()
        except trio.EndOfChannel:
            if self._failure is not None:
                raise self._failure from None
            raise StopAsyncIteration from None

    # ------------------------------------------------------------ the supervisor

    async def _run(
        self,
        grant: TokenGrant | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect (errors before the first link are raised to the opener), then keep a
        link up until closed; a failure no reconnect can cure ends the session."""
        reason = await self._start(grant, task_status)
        try:
            await self._reconnect(reason)
        except ClientError as exc:
            self._failure = exc
            self._events_in.close()
            self._signal()

    async def _start(
        self, grant: TokenGrant | None, task_status: trio.TaskStatus[None]
    ) -> ClientError:
        """The first link, retried only while the server is unreachable or busy; why it ended."""
        attempts = self._resilience.start_attempts
        failed = 0
        while True:
            try:
                return await self._hold(grant, task_status.started)
            except (ServerUnreachable, ServerBusy) as exc:
                failed += 1
                if failed >= attempts:
                    if isinstance(exc, ServerUnreachable):
                        raise gave_up(exc, attempts) from exc
                    raise
                await trio.sleep(self._resilience.backoff.delay(failed - 1))

    async def _reconnect(self, reason: ClientError) -> None:
        """Back off, connect, serve; again, until closed or a failure is not transient."""
        attempt = 0
        while not self._closing:
            delay = self._resilience.backoff.delay(attempt)
            attempt += 1
            await self._events_in.send(Reconnecting(attempt, delay, str(reason)))
            await trio.sleep(delay)
            began = trio.current_time()
            try:
                reason = await self._hold(None)
            except _TRANSIENT as exc:
                reason = exc
                continue
            if trio.current_time() - began >= STABLE_LINK:
                attempt = 0

    async def _hold(
        self, grant: TokenGrant | None, started: Callable[[], None] | None = None
    ) -> ClientError:
        """One link, from connect to its end: why it ended. Raises if it never came up."""
        async with connect_authorized(
            self._ws_url,
            self._ssl_context,
            self._tokens,
            heartbeat=self._heartbeat,
            grant=grant,
        ) as client:
            link = self._link = _Link(client)
            self.user_name, self.session = client.user_name, client.session
            try:
                await self._events_in.send(Online(client.session, first=not self._started))
                if started is not None:
                    started()
                self._started = True
                return await self._serve(link)
            finally:
                self._link = None
                self._signal()

    async def _serve(self, link: _Link) -> ClientError:
        """Pump messages while resubscribing every room; then until the link dies."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, link)
            try:
                await self._resubscribe(link)
            except ClientError as exc:
                if link.client.failure is None:  # alive but not answering: start over
                    nursery.cancel_scope.cancel()
                    return exc
            else:
                link.ready = True
                self._signal()
        return link.client.failure or ConnectionLost("the connection ended")

    async def _pump(self, link: _Link) -> None:
        """Deliver each message not delivered before; ends when the link does."""
        while True:
            try:
                message = await link.client.receive()
            except ClientError:
                return
            joining = link.joining.get(message.destination)
            if joining is not None:
                await joining.wait()
            if self._is_new(link, message):
                await self._events_in.send(_marked(link, message))
                # Recorded only once delivered: a send cut short is replayed on resume.
                if message.position is not None:
                    self._positions[message.destination] = message.position

    def _is_new(self, link: _Link, message: Message) -> bool:
        """Not from a room just left, and past the last position delivered for its topic."""
        if message.subscription in link.left:
            return False
        position = message.position
        last = self._positions.get(message.destination)
        return (
            position is None
            or last is None
            or last.epoch != position.epoch
            or position.offset > last.offset
        )

    # ------------------------------------------------------------ rooms on a link

    async def _resubscribe(self, link: _Link) -> None:
        """Every room on the new link, those with a position (replayed) first; rooms
        joined meanwhile too."""
        while pending := [room for room in self._rooms if room not in link.subs]:
            pending.sort(key=lambda room: self._resume_point(room) is None)
            for room in pending:
                if room in self._rooms:  # not left meanwhile
                    await self._rejoin(link, room)

    async def _rejoin(self, link: _Link, room: str) -> None:
        """`_join` for the resubscription: a room the policy refuses is dropped, or every
        link would die on it (the refusal closes this one)."""
        try:
            await self._join(link, room)
        except StompError as exc:
            if exc.message == FORBIDDEN:
                self._rooms.pop(room, None)
                self._forget(room)
                await self._events_in.send(Refused(room, str(exc)))
            raise

    async def _join(self, link: _Link, room: str) -> None:
        """SUBSCRIBE on `link`, from the room's position when it has one."""
        rejoining = self._rooms.get(room, False)
        since = self._resume_point(room)
        last = self._backlog.get(room, 0) if since is None else 0
        link.joining[room] = joined = trio.Event()
        try:
            subscribed = await link.client.subscribe(room, since=since, last=last)
            self._began(link, room, since, last, subscribed)
        finally:
            del link.joining[room]
            joined.set()
        link.subs[room] = subscribed.id
        if room not in self._rooms:  # left while we subscribed
            await self._leave(link, room)
            return
        self._rooms[room] = True
        if rejoining and not room.startswith(PRESENCE_PREFIX):
            await self._events_in.send(Recovered(room, bool(subscribed.recovered)))

    def _began(
        self, link: _Link, room: str, since: Position | None, last: int, subscribed: Subscribed
    ) -> None:
        """Record where a subscription began (its RECEIPT), before its messages are judged."""
        start = subscribed.start
        if start is None:  # a wildcard room, or a server without history
            return
        if since is None:
            self._starts[room] = start
            if last:
                link.history[room] = start
        elif since.epoch != start.epoch:  # history lost: all of the new epoch is news
            self._positions.pop(room, None)
            self._starts[room] = Position(start.epoch, 0)

    def _resume_point(self, room: str) -> Position | None:
        """Where to resume `room`: the later of the last delivered and where it began.

        Starting past undelivered history (`last:N`) is fine; a resume's own replay never
        moves the start, so what was missed is never skipped.
        """
        delivered, start = self._positions.get(room), self._starts.get(room)
        if delivered is None or (start is not None and start.epoch != delivered.epoch):
            return start or delivered
        if start is None or delivered.offset >= start.offset:
            return delivered
        return start

    def _forget(self, room: str) -> None:
        self._positions.pop(room, None)
        self._starts.pop(room, None)

    async def _leave(self, link: _Link, room: str) -> None:
        sub_id = link.subs.pop(room, None)
        if sub_id is None:
            return
        link.left.add(sub_id)
        with suppress(ClientError):  # a dead link has dropped it anyway
            await link.client.unsubscribe(sub_id)

    # ------------------------------------------------------------ state

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise ConnectionLost("the session is closed")

    def _signal(self) -> None:
        """Wake every task waiting for the link's state to change."""
        self._changed.set()
        self._changed = trio.Event()

    async def _ready_client(self, queued_at: float | None) -> StompClient:
        """The current link once it is up and resubscribed, waiting until the send timeout
        (counted from `queued_at`) has passed."""
        timeout = self._resilience.send_timeout
        start = trio.current_time() if queued_at is None else queued_at
        with trio.move_on_at(start + timeout):
            while True:
                self._check()
                link = self._link
                if link is not None and link.ready and link.client.failure is None:
                    return link.client
                await self._changed.wait()
        raise NotDelivered(
            f"not connected for {timeout:g} s; it was not sent", maybe_delivered=False
        )

    async def _close(self) -> None:
        """Leaving: DISCONNECT politely (bounded) unless we are being cancelled."""
        self._closing = True
        self._signal()
        link = self._link
        if link is not None and trio.current_effective_deadline() != -math.inf:
            with trio.move_on_after(2 * CLOSE_TIMEOUT):
                await link.client.disconnect()


def _marked(link: _Link, message: Message) -> Message:
    """`message`, flagged `history` when it came from before a `last:N` join."""
    until, position = link.history.get(message.destination), message.position
    if (
        until is None
        or position is None
        or position.epoch != until.epoch
        or position.offset > until.offset
    ):
        return message
    return replace(message, history=True)


@asynccontextmanager
async def connect_resilient(
    ws_url: str,
    ssl_context: ssl.SSLContext,
    tokens: TokenSource,
    *,
    heartbeat: tuple[int, int] = (10000, 10000),
    resilience: Resilience = DEFAULT_RESILIENCE,
    grant: TokenGrant | None = None,
) -> AsyncIterator[ResilientSession]:
    """A session whose first link is up (see the module docstring); closed on the way out.

    `grant` opens the first link instead of a fresh one. Errors before the first link are
    raised here: `ServerUnreachable` after `resilience.start_attempts` tries, others at once.
    """
    session = ResilientSession(ws_url, ssl_context, tokens, heartbeat, resilience)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session._run, grant)
            try:
                yield session
            finally:
                await session._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the nursery wraps what the body raised
        leaf = sole_exception(group)
        if leaf is None:
            raise
        raise leaf from leaf.__cause__
    finally:
        session._events_in.close()


@asynccontextmanager
async def open_session(
    url: str,
    cert: Path,
    key: Path,
    ca: Path,
    *,
    passphrase: bytes | None = None,
    token_file: Path | None = None,
    on_notice: Notice = log.warning,
    heartbeat: tuple[int, int] = (10000, 10000),
    resilience: Resilience = DEFAULT_RESILIENCE,
) -> AsyncIterator[ResilientSession]:
    """Certificate files to a resilient session (`url`: wss:// STOMP or https:// base URL).

    `token_file` keeps the refresh token across runs (None: memory only); `on_notice` hears
    token warnings meant for the user. Raises `PkiError` for unusable certificate files.
    """
    base_url, ws_url = server_urls(url)
    ssl_context = client_ssl_context(cert, key, ca, passphrase)
    tokens = TokenSource(base_url, ssl_context, token_store(token_file), on_notice)
    async with connect_resilient(
        ws_url, ssl_context, tokens, heartbeat=heartbeat, resilience=resilience
    ) as session:
        yield session
