"""The policy of one STOMP 1.2 session, as plain code: the client's frames as typed events in,
answers out, bytes pushed to an outbox, broker calls.

The protocol itself (states, required headers, version and heart-beat negotiation) is the
connection's `StompConnection` (chat.protocol); what is left here is what this server
decides: authorization, limits, routing, history. It never awaits, so a connection's reader
can never be blocked by application work (pings and closes are always answered). The
connection layer (`connection.py`) owns the I/O and the StompConnection, sends the answers
`handle()` returns through it, and turns the `StompProtocolError`s raised here into
`ERROR` + close.

Replays (`since-offset`, `last`) are paged (PROTOCOL.md §11): a subscription that has history
to catch up on is a `_Replay` cursor, not yet in the broker. The connection's writer calls
`refill()` each time it has sent what was pending; the oldest cursor then pushes its next
committed messages, a bounded chunk. A cursor that reaches the topic's high-water mark joins
the broker in the same synchronous step, and live fan-out happens synchronously when a commit
is marked, so between replay and live there is no gap and no duplicate. Messages that are on
disk only (the history's memory is bounded) are fetched off the event loop a page at a time
(`Durability.read_later`); the cursor waits meanwhile, then `wake()` (the connection's refill)
pages them in. A frame's topics are in memory before `handle()` sees it: the connection awaits
`Durability.loaded(history_needs(event))` first.

Authorization (PROTOCOL.md §9) is decided when a subscription is made and when a frame is sent,
never per delivered message: the session holds its identity's `Rights` from the policy in
force, and each `check_authorization()` (the connection's guard at the token's expiry, the
server's watchers after each revocation or policy change) compares them with the current ones;
a subscription the new rights no longer allow ends the session with `ERROR message:forbidden`.
A SEND to `/user/NAME` is stored twice (§10): in NAME's inbox and in the sender's own; `post`
does that for a SEND and for an admin's publish (admin.py) alike. Exact
topic subscriptions make their identity a member of the room (§11); a `/presence/ROOM`
subscription gets its snapshot after its RECEIPT.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from chat.history import HistoryGap, NotLoaded, OnDisk
from chat.protocol import events
from chat.protocol.errors import HttpRefusal, InvalidDestination, MalformedFrame, PolicyViolation
from chat.protocol.policy import Policy
from chat.protocol.stomp import Frame
from chat.protocol.tokens import Claims, TokenAuthority, check_binding
from chat.protocol.topics import (
    PRESENCE,
    TOPIC,
    USER,
    USER_PREFIX,
    Route,
    is_exact,
    parse_route,
)
from chat.protocol.wire import TEXT_PLAIN, TOKEN_DESTINATION
from chat.server.broker import (
    SERVER_HEADERS,
    Broker,
    Outbox,
    Published,
    Subscription,
    message_frame,
    message_tail,
)
from chat.server.durability import Durability
from chat.server.presence import Presence
from chat.server.storage import StorageUnavailable
from chat.store.history import Stored

SERVER_NAME = "chat/0.1"
# One refill of a replay: big enough to amortize a send_all, small next to a default outbox.
REPLAY_CHUNK_BYTES = 256 * 1024
# A refill tops the outbox up to at most this fraction of its limit: live traffic keeps room.
REPLAY_OUTBOX_SHARE = 4
# `since-offset` and `last` take plain ASCII digits, at most this many (any offset < 2**63);
# Python's int() refuses very long digit strings with a ValueError.
MAX_COUNT_DIGITS = 18
QUOTED_VALUE_CHARS = 40  # an ERROR quotes at most this much of a bad header value
HISTORY_HEADERS = ("since-offset", "last")  # SUBSCRIBE headers asking for a replay (§8, §11)
_session_ids = itertools.count(1)


class Unsupported(PolicyViolation):
    """Valid STOMP this server deliberately does not do (transactions, client acks)."""


class AuthorizationLost(PolicyViolation):
    """The connection's token expired, was revoked, or a renewal was refused (PROTOCOL.md §7)."""


class Forbidden(PolicyViolation):
    """The policy does not grant this subscription or send (PROTOCOL.md §9)."""


class ReplayFellBehind(PolicyViolation):
    """Retention dropped messages a replay had not sent yet: the client must resume again."""


class SessionOutbox(Outbox, Protocol):
    """The connection's outbox as the session sees it: replays are paged by its fill level."""

    @property
    def limit(self) -> int: ...

    @property
    def pending(self) -> int: ...


@dataclass(slots=True)
class _Replay:
    """A subscription still catching up on history; it joins the broker at the high-water mark."""

    destination: str
    epoch: str
    after: int  # the last offset pushed (or where the replay starts)
    route: Route
    subscription: Subscription
    page: list[Stored] = field(default_factory=list)  # read from disk, not pushed yet
    waiting: bool = False  # for a page from disk, or its topic to be read back into memory
    gone: HistoryGap | None = None  # what the disk said: the messages are no longer retained


@dataclass(frozen=True, slots=True)
class _Live:
    """One of the session's subscriptions: a topic pattern, its own inbox, or a presence watch."""

    destination: str
    route: Route
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Acted:
    """The answer to a frame: a reply (CONNECTED), its RECEIPT's extra headers and the append
    the RECEIPT waits for, and whether the client is leaving."""

    receipt_headers: tuple[tuple[str, str], ...] = ()
    durable_seq: int = 0
    disconnect: bool = False
    reply: Frame | None = None
    then: Callable[[], None] | None = None  # once the RECEIPT (if any) is pushed: `then()`


ACTED = Acted()


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_subscriptions: int  # per connection
    heartbeat: tuple[int, int]
    max_subscriptions_per_identity: int = 1024  # across its connections
    publish_rate: float = 0.0  # SENDs per second and connection; 0: no limit
    publish_burst: int = 1000


class IdentitySubscriptions:
    """Live subscriptions per identity, across all its connections: each is one more copy of
    every message it matches, so this is what bounds an identity's fan-out amplification."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, identity: str) -> int:
        return self._counts.get(identity, 0)

    def add(self, identity: str) -> None:
        self._counts[identity] = self.count(identity) + 1

    def remove(self, identity: str) -> None:
        left = self._counts.pop(identity) - 1
        if left:
            self._counts[identity] = left


@dataclass(frozen=True, slots=True)
class Shared:
    """What every session of one server shares."""

    broker: Broker
    presence: Presence
    policy: Callable[[], Policy]  # the policy in force, re-read when its file changes
    authority: TokenAuthority
    is_revoked: Callable[[Claims], bool]
    clock: Callable[[], float]  # the wall clock
    limits: SessionLimits
    subscriptions: IdentitySubscriptions = field(default_factory=IdentitySubscriptions)


@functools.lru_cache(maxsize=4096)
def _send_route(destination: str) -> Route:
    # Publishers reuse a handful of destinations: validate each once.
    return parse_route(destination, wildcards=False)


def _room(route: Route) -> str:
    return ".".join(route.pattern)


def _content_type(frame: Frame) -> str:
    declared = frame.get("content-type")
    if declared:
        return declared
    try:
        frame.body.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return TEXT_PLAIN


@dataclass(frozen=True, slots=True)
class Posted:
    """A message stored: its copy at the destination, and the append sequence that makes
    every copy durable."""

    stored: Stored
    durable_seq: int


def stored_in(destination: str, route: Route, sender: str) -> tuple[str, ...]:
    """The history topics a message from `sender` to `destination` is stored in, which must
    be in memory before `post`: a direct message goes to both inboxes (PROTOCOL.md §10)."""
    if route.space == USER:
        return (destination, USER_PREFIX + sender)
    return (destination,) if route.space == TOPIC else ()


def post(broker: Broker, message: Published) -> Posted:
    """Store a message its sender may send and deliver it once durable (a session's SEND, an
    admin's publish). A direct message (PROTOCOL.md §10) is one copy in NAME's inbox and one
    in the sender's (once, to oneself), both with `to`."""
    if message.route.space != USER:
        stored = broker.publish(message)
        return Posted(stored, stored.seq)
    name = message.route.pattern[0]
    headers = (*message.extra_headers, ("to", name))
    copies = [
        broker.publish(
            replace(
                message,
                destination=USER_PREFIX + owner,
                route=Route(USER, (owner,)),
                extra_headers=headers,
            )
        )
        for owner in dict.fromkeys((name, message.sender))
    ]
    return Posted(copies[0], max(copy.seq for copy in copies))


class StompSession:
    """The policy state of one authenticated STOMP connection."""

    def __init__(self, outbox: SessionOutbox, claims: Claims, shared: Shared) -> None:
        self.outbox = outbox
        self.claims = claims
        self.id = f"s{next(_session_ids)}"
        self._broker = shared.broker
        self._presence = shared.presence
        self._policy = shared.policy
        self._limits = shared.limits
        self._authority = shared.authority
        self._is_revoked = shared.is_revoked
        self._clock = shared.clock
        self._identity_subscriptions = shared.subscriptions
        self._rights = self._policy().rights(claims.sub)
        self._subscriptions: dict[str, _Live] = {}
        self._replays: dict[str, _Replay] = {}  # by subscription id, oldest first
        self._receipt_floor = (
            0  # receipts leave in order: none before an earlier one's data is durable
        )
        # Called when a replay's page came from disk; the connection sets it to its refill,
        # which turns ReplayFellBehind into ERROR + close.
        self.wake: Callable[[], None] = self.refill
        self._handlers: dict[type[events.Event], Callable[[Any], Acted]] = {
            events.Connect: self._connect,
            events.Send: self._send,
            events.Subscribe: self._subscribe,
            events.Unsubscribe: self._unsubscribe,
            events.Disconnect: self._disconnect,
            events.Ack: self._client_ack,
            events.Nack: self._client_ack,
            events.Begin: self._transaction,
            events.Commit: self._transaction,
            events.Abort: self._transaction,
        }

    @property
    def identity(self) -> str:
        return self.claims.sub

    @property
    def durability(self) -> Durability:
        """Where the history's reads off the event loop go (`history_needs`, replays)."""
        return self._broker.durability

    @property
    def limits(self) -> SessionLimits:
        return self._limits

    def handle(self, event: events.Event) -> Acted:
        """Act on one of the client's frames, as the protocol let it through; the answer."""
        return self._handlers[type(event)](event)

    def receipt(self, data: bytes, durable_seq: int) -> None:
        """Push a RECEIPT (`data`, ready to write) once `durable_seq` is durable: receipts
        leave in order, none before an earlier one's data is durable (PROTOCOL.md §8)."""
        self._receipt_floor = max(self._receipt_floor, durable_seq)
        self._broker.durability.after(self._receipt_floor, lambda: self.outbox.push(data))

    def then(self, action: Callable[[], None]) -> None:
        """Run `action` once every RECEIPT pushed so far has left (a presence snapshot
        follows its SUBSCRIBE's RECEIPT, PROTOCOL.md §11)."""
        self._broker.durability.after(self._receipt_floor, action)

    def close(self) -> None:
        """Drop every subscription and replay; the connection is going away."""
        for sub_id in list(self._subscriptions):
            self._end(sub_id)

    def refill(self) -> None:
        """Page replays into the outbox, oldest first, up to the budget; the writer calls it.

        Raises ReplayFellBehind when retention dropped messages a replay has not sent yet.
        """
        if not self._replays:  # the common case, once per send_all: keep it cheap
            return
        budget = max(1, min(REPLAY_CHUNK_BYTES, self.outbox.limit // REPLAY_OUTBOX_SHARE))
        room = budget - self.outbox.pending
        while room > 0 and self._replays:
            replay = next(iter(self._replays.values()))
            if replay.waiting:  # replays go in order: the next waits for this one
                return
            room -= self._pump(replay, room)

    def _pump(self, replay: _Replay, room: int) -> int:
        """Push `replay`'s next messages, about `room` bytes (its page from disk first); go
        live at the high-water mark; start a read when the next ones are not in memory."""
        if replay.gone is not None:
            raise _fell_behind(replay) from replay.gone
        if replay.page:
            return self._push_page(replay, room)
        durability = self._broker.durability
        try:
            messages = self._broker.history.read(
                replay.destination, replay.after, replay.epoch, self._now_ms()
            )
        except OnDisk as disk:
            replay.waiting = True
            durability.read_later(disk.page, functools.partial(self._page_read, replay))
            return 0
        except NotLoaded:  # the topic left memory since the replay began
            replay.waiting = True
            durability.load_later((replay.destination,), functools.partial(self._loaded, replay))
            return 0
        except HistoryGap as gap:
            raise _fell_behind(replay) from gap
        pushed = 0
        for stored in messages:
            pushed += self._push(replay, stored)
            if pushed >= room:
                return pushed
        self._go_live(replay)
        return pushed

    def _push(self, replay: _Replay, stored: Stored) -> int:
        data = message_frame(replay.subscription.id, message_tail(stored))
        self.outbox.push(data)
        replay.after = stored.offset
        return len(data)

    def _push_page(self, replay: _Replay, room: int) -> int:
        """Push from the page read from disk, about `room` bytes; what is pushed leaves it."""
        pushed = taken = 0
        for stored in replay.page:
            if pushed >= room:
                break
            taken += 1
            pushed += self._push(replay, stored)
        del replay.page[:taken]
        return pushed

    def _page_read(self, replay: _Replay, page: list[Stored] | HistoryGap) -> None:
        """(On the loop) the next page of `replay` came from disk, or the news that it is
        gone: page it in (or fail the replay)."""
        if isinstance(page, HistoryGap):
            replay.gone = page
        elif page[0].offset != replay.after + 1:  # fetch() reads a contiguous range
            replay.gone = HistoryGap(f"{replay.destination}: offset {replay.after + 1} is gone")
        else:
            replay.page = page
        self._resume(replay)

    def _loaded(self, replay: _Replay, failure: StorageUnavailable | None) -> None:
        """(On the loop) the replay's topic is back in memory, or could not be read."""
        if failure is not None:
            replay.gone = HistoryGap(failure.detail)
        self._resume(replay)

    def _resume(self, replay: _Replay) -> None:
        replay.waiting = False
        if self._replays.get(replay.subscription.id) is replay:  # not unsubscribed meanwhile
            self.wake()

    def history_needs(self, event: events.Event) -> tuple[str, ...]:
        """The history topics `handle(event)` will use, which must be in memory first."""
        if isinstance(event, events.Send) and event.destination != TOKEN_DESTINATION:
            destination, wildcards = event.destination, False
        elif isinstance(event, events.Subscribe):
            destination, wildcards = event.destination, True
        else:
            return ()
        try:  # a SEND's route is the one _send() looks up next: the same cache
            route = (
                parse_route(destination, wildcards=True) if wildcards else _send_route(destination)
            )
        except InvalidDestination:
            return ()  # handle() says why
        if not wildcards:
            return stored_in(destination, route, self.identity)
        if route.space in (TOPIC, USER) and is_exact(route.pattern):
            return (destination,)
        return ()

    def destinations(self) -> list[str]:
        """What the session is subscribed to, oldest first (replays included)."""
        return [live.destination for live in self._subscriptions.values()]

    def _go_live(self, replay: _Replay) -> None:
        # Synchronous with the read that reached the high-water mark: no gap, no duplicate.
        del self._replays[replay.subscription.id]
        self._broker.subscribe(replay.route, replay.subscription)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check_authorization(self) -> None:
        """Raise AuthorizationLost once the token has expired or been revoked, Forbidden once
        the policy no longer allows one of the subscriptions."""
        if self._clock() >= self.claims.exp:
            raise AuthorizationLost("token expired", "the access token expired; renew it")
        if self._is_revoked(self.claims):
            raise AuthorizationLost("token revoked", "the access token or identity was revoked")
        rights = self._policy().rights(self.identity)
        if rights is not self._rights:  # the policy changed (the usual answer is a cache hit)
            self._rights = rights
            for live in self._subscriptions.values():
                self._authorize(live.destination, live.route, "no longer lets")

    def expires_in(self) -> float:
        """Seconds until the token expires, by the wall clock: when the connection's guard
        must look next, if nothing else is due before."""
        return self.claims.exp - self._clock()

    def _authorize(self, destination: str, route: Route, verb: str = "does not let") -> None:
        """Forbidden unless the rights allow subscribing to `route` (PROTOCOL.md §9-§11)."""
        if route.space == USER:
            allowed = route.pattern == (self.identity,)  # an inbox is its owner's alone
        else:  # a topic pattern, or the room a presence subscription watches
            allowed = self._rights.may_subscribe(route.pattern)
        if not allowed:
            raise Forbidden(
                "forbidden", f"the policy {verb} {self.identity} subscribe to {destination}"
            )

    def _connect(self, event: events.Connect) -> Acted:
        offer = self._limits.heartbeat
        return Acted(
            reply=Frame(
                "CONNECTED",
                (
                    ("version", event.version),
                    ("heart-beat", f"{offer[0]},{offer[1]}"),
                    ("session", self.id),
                    ("server", SERVER_NAME),
                    ("user-name", self.identity),
                ),
            )
        )

    def _send(self, event: events.Send) -> Acted:
        frame, destination = event.frame, event.destination
        if destination == TOKEN_DESTINATION:
            self._renew(frame.body)
            return ACTED
        route = _send_route(destination)
        if route.space == PRESENCE:
            raise InvalidDestination(
                "cannot send to presence", f"{destination} is announced by the server"
            )
        self._authorize_send(destination, route)
        extra = tuple((name, value) for name, value in frame.headers if name not in SERVER_HEADERS)
        message = Published(
            destination, route, self.identity, _content_type(frame), frame.body, extra
        )
        return Acted(durable_seq=post(self._broker, message).durable_seq)

    def _authorize_send(self, destination: str, route: Route) -> None:
        """Forbidden unless the rights allow publishing to the topic, or messaging the inbox's
        owner (PROTOCOL.md §9, §10)."""
        if route.space == USER:
            name = route.pattern[0]
            if not self._rights.may_message(name):
                raise Forbidden(
                    "forbidden", f"the policy does not let {self.identity} message {name}"
                )
        elif not self._rights.may_publish(route.pattern):
            raise Forbidden(
                "forbidden", f"the policy does not let {self.identity} publish to {destination}"
            )

    def _renew(self, body: bytes) -> None:
        try:
            claims = self._authority.verify(body.decode("ascii").strip(), self._clock())
            check_binding(claims, self.claims.sub, self.claims.x5t)
        except UnicodeDecodeError as exc:
            raise AuthorizationLost("token renewal refused", "the body is not a token") from exc
        except HttpRefusal as exc:
            raise AuthorizationLost("token renewal refused", f"{exc.code}: {exc.detail}") from exc
        if self._is_revoked(claims):
            raise AuthorizationLost("token renewal refused", "token_revoked: the token is revoked")
        if claims.exp < self.claims.exp:
            raise AuthorizationLost(
                "token renewal refused",
                f"the token expires at {claims.exp}, before the current one ({self.claims.exp}):"
                " a renewal never shortens the authorization",
            )
        self.claims = claims

    def _subscribe(self, event: events.Subscribe) -> Acted:
        frame, destination, sub_id = event.frame, event.destination, event.id
        self._check_new_subscription(event)
        route = parse_route(destination, wildcards=True)
        self._authorize(destination, route)
        asked = _history_request(frame, destination, route)
        subscription = Subscription(self.outbox, sub_id)
        live = self._subscriptions[sub_id] = _Live(destination, route, subscription)
        self._identity_subscriptions.add(self.identity)
        if route.space == PRESENCE:
            return Acted(then=lambda: self._watch(sub_id, live))
        if route.space == TOPIC and is_exact(route.pattern):
            self._presence.join(_room(route), self.identity)
        if not is_exact(route.pattern):
            self._broker.subscribe(route, subscription)
            return ACTED
        return self._subscribe_exact(frame, destination, route, subscription, asked)

    def _watch(self, sub_id: str, live: _Live) -> None:
        if self._subscriptions.get(sub_id) is live:  # not unsubscribed before its RECEIPT left
            self._presence.watch(_room(live.route), live.subscription)

    def _check_new_subscription(self, event: events.Subscribe) -> None:
        sub_id = event.id
        if sub_id in self._subscriptions:
            raise PolicyViolation("duplicate subscription id", f"id '{sub_id}' is already in use")
        if len(self._subscriptions) >= self._limits.max_subscriptions:
            raise PolicyViolation(
                "too many subscriptions",
                f"at most {self._limits.max_subscriptions} subscriptions per connection",
            )
        per_identity = self._limits.max_subscriptions_per_identity
        if self._identity_subscriptions.count(self.identity) >= per_identity:
            raise PolicyViolation(
                "too many subscriptions",
                f"at most {per_identity} subscriptions per identity, across its connections",
            )
        if event.ack != "auto":
            raise Unsupported(
                "unsupported ack mode", f"only ack:auto is supported, not {event.ack}"
            )

    def _subscribe_exact(
        self,
        frame: Frame,
        destination: str,
        route: Route,
        subscription: Subscription,
        asked: tuple[str, int] | None,
    ) -> Acted:
        """Start at the high-water mark, or replay first (PROTOCOL.md §8 since-offset, §11 last).

        The RECEIPT says where the subscription starts, so a client in a quiet room can resume
        later; it waits until the topic's epoch is durable.
        """
        position = self._broker.position(destination)
        after, headers = self._replay_start(frame, destination, asked, position.offset)
        if after < position.offset:
            replay = _Replay(destination, position.epoch, after, route, subscription)
            self._replays[subscription.id] = replay
            self.refill()
        else:
            self._broker.subscribe(route, subscription)
        headers += (("epoch", position.epoch), ("offset", str(position.offset)))
        return Acted(headers, durable_seq=position.durable_seq)

    def _replay_start(
        self, frame: Frame, destination: str, asked: tuple[str, int] | None, offset: int
    ) -> tuple[int, tuple[tuple[str, str], ...]]:
        """The offset a replay starts after (`offset`: none), and a resume's `recovered`."""
        if asked is None:
            return offset, ()
        name, count = asked
        history = self._broker.history
        if name == "last":
            return history.tail(destination, count, self._now_ms()), ()
        resume = history.resume(destination, count, frame.get("epoch"), self._now_ms())
        return resume.after, (("recovered", "true" if resume.recovered else "false"),)

    def _unsubscribe(self, event: events.Unsubscribe) -> Acted:
        sub_id = event.id
        if sub_id not in self._subscriptions:
            raise PolicyViolation("unknown subscription", f"no subscription with id '{sub_id}'")
        self._end(sub_id)
        return ACTED

    def _end(self, sub_id: str) -> None:
        live = self._subscriptions.pop(sub_id)
        self._identity_subscriptions.remove(self.identity)
        route, subscription = live.route, live.subscription
        if route.space == PRESENCE:
            self._presence.unwatch(_room(route), subscription)
            return
        if self._replays.pop(sub_id, None) is None:  # mid-replay it is not in the broker yet
            self._broker.unsubscribe(route, subscription)
        if route.space == TOPIC and is_exact(route.pattern):
            self._presence.leave(_room(route), self.identity)

    def _disconnect(self, event: events.Disconnect) -> Acted:
        return Acted(disconnect=True)

    def _client_ack(self, event: events.Ack | events.Nack) -> Acted:
        command = event.frame.command
        raise Unsupported(f"{command} not supported", "subscriptions are ack:auto only")

    def _transaction(self, event: events.Begin | events.Commit | events.Abort) -> Acted:
        command = event.frame.command
        raise Unsupported(f"{command} not supported", "transactions are not supported")


def _fell_behind(replay: _Replay) -> ReplayFellBehind:
    return ReplayFellBehind(
        "replay fell behind retention",
        f"messages of {replay.destination} after offset {replay.after} are no longer"
        " retained; subscribe again with since-offset to resume",
    )


def _history_request(frame: Frame, destination: str, route: Route) -> tuple[str, int] | None:
    """The SUBSCRIBE's replay request, ("since-offset" or "last", N), validated; or None."""
    asked = [(name, value) for name in HISTORY_HEADERS if (value := frame.get(name)) is not None]
    if not asked:
        return None
    if len(asked) > 1:
        raise MalformedFrame(
            "since-offset and last together",
            "use since-offset (with epoch) to resume after an offset you saw, or last to get"
            " the latest messages; not both",
        )
    name, value = asked[0]
    if route.space == PRESENCE:
        raise InvalidDestination(
            f"{name} needs a topic or an inbox", f"{destination} has no history to replay"
        )
    if not is_exact(route.pattern):
        raise InvalidDestination(
            f"{name} needs an exact topic",
            f"cannot replay history into the wildcard subscription {destination}",
        )
    return name, _count(name, value)


def _count(name: str, value: str) -> int:
    """0 or more in plain ASCII digits ("²".isdigit() is True), few enough for int()."""
    if value.isascii() and value.isdigit() and len(value) <= MAX_COUNT_DIGITS:
        return int(value)
    quoted = value[:QUOTED_VALUE_CHARS] + ("..." if len(value) > QUOTED_VALUE_CHARS else "")
    raise MalformedFrame(
        f"invalid {name}",
        f"{name} must be 0 or more, in at most {MAX_COUNT_DIGITS} ASCII digits: {quoted!r}",
    )
