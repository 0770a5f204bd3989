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
is marked, so between replay and live there is no gap and no duplicate.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from chat.history import HistoryGap
from chat.protocol import events
from chat.protocol.errors import HttpRefusal, InvalidDestination, MalformedFrame, PolicyViolation
from chat.protocol.stomp import Frame
from chat.protocol.tokens import Claims, TokenAuthority, check_binding
from chat.protocol.topics import ANY, ONE, parse_destination
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
    pattern: tuple[str, ...]
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Acted:
    """The answer to a frame: a reply (CONNECTED), its RECEIPT's extra headers and the append
    the RECEIPT waits for, and whether the client is leaving."""

    receipt_headers: tuple[tuple[str, str], ...] = ()
    durable_seq: int = 0
    disconnect: bool = False
    reply: Frame | None = None


ACTED = Acted()


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_subscriptions: int
    heartbeat: tuple[int, int]


@functools.lru_cache(maxsize=4096)
def _send_topic(destination: str) -> tuple[str, ...]:
    # Publishers reuse a handful of destinations: validate each once.
    return parse_destination(destination, wildcards=False)


def _content_type(frame: Frame) -> str:
    declared = frame.get("content-type")
    if declared:
        return declared
    try:
        frame.body.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return TEXT_PLAIN


class StompSession:
    """The policy state of one authenticated STOMP connection."""

    def __init__(
        self,
        outbox: SessionOutbox,
        broker: Broker,
        claims: Claims,
        limits: SessionLimits,
        authority: TokenAuthority,
        is_revoked: Callable[[Claims], bool],
        clock: Callable[[], float],
    ) -> None:
        self.outbox = outbox
        self.claims = claims
        self.id = f"s{next(_session_ids)}"
        self._broker = broker
        self._limits = limits
        self._authority = authority
        self._is_revoked = is_revoked
        self._clock = clock
        self._subscriptions: dict[str, tuple[tuple[str, ...], Subscription]] = {}
        self._replays: dict[str, _Replay] = {}  # by subscription id, oldest first
        self._receipt_floor = (
            0  # receipts leave in order: none before an earlier one's data is durable
        )
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

    def handle(self, event: events.Event) -> Acted:
        """Act on one of the client's frames, as the protocol let it through; the answer."""
        return self._handlers[type(event)](event)

    def receipt(self, data: bytes, durable_seq: int) -> None:
        """Push a RECEIPT (`data`, ready to write) once `durable_seq` is durable: receipts
        leave in order, none before an earlier one's data is durable (PROTOCOL.md §8)."""
        self._receipt_floor = max(self._receipt_floor, durable_seq)
        self._broker.durability.after(self._receipt_floor, lambda: self.outbox.push(data))

    def close(self) -> None:
        """Drop every subscription and replay; the connection is going away."""
        self._replays.clear()
        for pattern, subscription in self._subscriptions.values():
            self._broker.unsubscribe(pattern, subscription)
        self._subscriptions.clear()

    def refill(self) -> None:
        """Page replays into the outbox, oldest first, up to the budget; the writer calls it.

        Raises ReplayFellBehind when retention dropped messages a replay has not sent yet.
        """
        if not self._replays:  # the common case, once per send_all: keep it cheap
            return
        budget = max(1, min(REPLAY_CHUNK_BYTES, self.outbox.limit // REPLAY_OUTBOX_SHARE))
        room = budget - self.outbox.pending
        while room > 0 and self._replays:
            room -= self._pump(next(iter(self._replays.values())), room)

    def _pump(self, replay: _Replay, room: int) -> int:
        """Push `replay`'s next messages, about `room` bytes; go live at the high-water mark."""
        try:
            messages = self._broker.history.read(
                replay.destination, replay.after, replay.epoch, self._now_ms()
            )
        except HistoryGap as gap:
            raise ReplayFellBehind(
                "replay fell behind retention",
                f"messages of {replay.destination} after offset {replay.after} are no longer"
                " retained; subscribe again with since-offset to resume",
            ) from gap
        pushed = 0
        sub_id = replay.subscription.id
        for stored in messages:
            data = message_frame(sub_id, message_tail(stored))
            self.outbox.push(data)
            replay.after = stored.offset
            pushed += len(data)
            if pushed >= room:
                return pushed
        self._go_live(replay)
        return pushed

    def _go_live(self, replay: _Replay) -> None:
        # Synchronous with the read that reached the high-water mark: no gap, no duplicate.
        del self._replays[replay.subscription.id]
        self._broker.subscribe(replay.pattern, replay.subscription)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check_authorization(self) -> None:
        """Raise AuthorizationLost once the token has expired or been revoked."""
        if self._clock() >= self.claims.exp:
            raise AuthorizationLost("token expired", "the access token expired; renew it")
        if self._is_revoked(self.claims):
            raise AuthorizationLost("token revoked", "the access token or identity was revoked")

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
        extra = tuple((name, value) for name, value in frame.headers if name not in SERVER_HEADERS)
        stored = self._broker.publish(
            Published(
                destination,
                _send_topic(destination),
                self.identity,
                _content_type(frame),
                frame.body,
                extra,
            )
        )
        return Acted(durable_seq=stored.seq)

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
        self.claims = claims

    def _subscribe(self, event: events.Subscribe) -> Acted:
        frame, destination, sub_id = event.frame, event.destination, event.id
        self._check_new_subscription(event)
        pattern = parse_destination(destination, wildcards=True)
        exact = ANY not in pattern and ONE not in pattern
        asked = _history_request(frame, destination, exact)
        subscription = Subscription(self.outbox, sub_id)
        self._subscriptions[sub_id] = (pattern, subscription)
        if not exact:
            self._broker.subscribe(pattern, subscription)
            return ACTED
        return self._subscribe_exact(frame, destination, pattern, subscription, asked)

    def _check_new_subscription(self, event: events.Subscribe) -> None:
        sub_id = event.id
        if sub_id in self._subscriptions:
            raise PolicyViolation("duplicate subscription id", f"id '{sub_id}' is already in use")
        if len(self._subscriptions) >= self._limits.max_subscriptions:
            raise PolicyViolation(
                "too many subscriptions",
                f"at most {self._limits.max_subscriptions} subscriptions per connection",
            )
        if event.ack != "auto":
            raise Unsupported(
                "unsupported ack mode", f"only ack:auto is supported, not {event.ack}"
            )

    def _subscribe_exact(
        self,
        frame: Frame,
        destination: str,
        pattern: tuple[str, ...],
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
            replay = _Replay(destination, position.epoch, after, pattern, subscription)
            self._replays[subscription.id] = replay
            self.refill()
        else:
            self._broker.subscribe(pattern, subscription)
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
        entry = self._subscriptions.pop(sub_id, None)
        if entry is None:
            raise PolicyViolation("unknown subscription", f"no subscription with id '{sub_id}'")
        if self._replays.pop(sub_id, None) is None:  # mid-replay it is not in the broker yet
            self._broker.unsubscribe(*entry)
        return ACTED

    def _disconnect(self, event: events.Disconnect) -> Acted:
        return Acted(disconnect=True)

    def _client_ack(self, event: events.Ack | events.Nack) -> Acted:
        command = event.frame.command
        raise Unsupported(f"{command} not supported", "subscriptions are ack:auto only")

    def _transaction(self, event: events.Begin | events.Commit | events.Abort) -> Acted:
        command = event.frame.command
        raise Unsupported(f"{command} not supported", "transactions are not supported")


def _history_request(frame: Frame, destination: str, exact: bool) -> tuple[str, int] | None:
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
    if not exact:
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
