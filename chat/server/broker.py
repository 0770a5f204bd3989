"""Subscriptions, history and fan-out.

How this works: a published message is first appended to the history, which gives it its
per-topic `offset` and the topic's `epoch` and queues it for the committer; once it is
committed (at once for a memory history) it is encoded once and delivered. A STOMP
`MESSAGE` differs between recipients only in its `subscription` header, so the frame is
`MESSAGE\\n` + `subscription:ID\\n` + the common tail, and the finished WebSocket frame is
cached per distinct subscription id for the duration of one delivery (clients tend to reuse
the same few ids, so most recipients share one bytes object). Each recipient's `Outbox`
only appends those bytes: a publisher never waits on a subscriber. For the metrics the
broker adds to two plain ints (one addition per publish, not per recipient) and hands each
publish's first recipient, with the time the SEND was handled, to `sample` (metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from chat.history import History, Position
from chat.protocol.stomp import encode_header
from chat.protocol.topics import TOPIC, USER, Route, TopicTrie
from chat.server.durability import Durability
from chat.store.history import Stored
from chat.wsframes import data_frame


class Outbox(Protocol):
    """A connection's outbound side, as far as fan-out is concerned."""

    def push(self, data: bytes) -> None: ...


Sample = Callable[[Outbox, float], None]  # a recipient, and when its message was handled


@dataclass(frozen=True, slots=True)
class Subscription:
    outbox: Outbox
    id: str


@dataclass(frozen=True, slots=True)
class Published:
    """What the broker needs of a SEND, already validated by the session."""

    destination: str
    route: Route  # a topic, or an inbox (PROTOCOL.md §10)
    sender: str
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()


# Headers the server sets itself on MESSAGE; a sender's copies are dropped (PROTOCOL.md §4).
SERVER_HEADERS = frozenset(
    {
        "destination",
        "message-id",
        "subscription",
        "content-type",
        "content-length",
        "sender",
        "timestamp",
        "receipt",
        "offset",
        "epoch",
        "ack",
        "transaction",
        "to",
    }
)


class Broker:
    """Holds every subscription in a trie per space (topics, inboxes: a `#` on topics must
    never match an inbox), records and delivers published messages."""

    def __init__(
        self, history: History, durability: Durability, clock: Callable[[], float] = time.time
    ) -> None:
        self._tries: dict[str, TopicTrie[Subscription]] = {TOPIC: TopicTrie(), USER: TopicTrie()}
        self.history = history
        self.durability = durability
        self._clock = clock  # the wall clock of MESSAGE timestamps
        self.published = 0  # messages stored (a direct message: one per inbox copy)
        self.delivered = 0  # MESSAGE frames handed to subscribers' outboxes
        self.sample: Sample | None = None  # times publish-to-write for one recipient

    def subscribe(self, route: Route, subscription: Subscription) -> None:
        self._tries[route.space].add(route.pattern, subscription)

    def unsubscribe(self, route: Route, subscription: Subscription) -> None:
        self._tries[route.space].discard(route.pattern, subscription)

    def __len__(self) -> int:
        return sum(len(trie) for trie in self._tries.values())

    def position(self, destination: str) -> Position:
        """Where a subscription made now starts; wakes the committer if its epoch is new."""
        position = self.history.position(destination)
        if position.durable_seq > self.history.committed_seq:
            self.durability.appended()
        return position

    def publish(self, message: Published) -> Stored:
        """Give the message its offset, queue it for disk, deliver it once it is there."""
        stored = self.history.append(
            message.destination,
            message.sender,
            message.content_type,
            message.body,
            message.extra_headers,
            int(self._clock() * 1000),
        )
        self.durability.appended()
        self.published += 1
        handled = time.perf_counter()
        # Visible once durable: nobody may see an offset a crash could give to another message.
        self.durability.after(stored.seq, lambda: self._deliver(stored, message.route, handled))
        return stored

    def _deliver(self, stored: Stored, route: Route, handled: float) -> None:
        recipients = self._tries[route.space].match(route.pattern)
        if not recipients:
            return
        self.delivered += len(recipients)
        tail = message_tail(stored)
        frames: dict[str, bytes] = {}
        for sub in recipients:
            frame = frames.get(sub.id)
            if frame is None:
                frame = frames[sub.id] = message_frame(sub.id, tail)
            sub.outbox.push(frame)
        if self.sample is not None:
            self.sample(recipients[0].outbox, handled)


def message_frame(subscription_id: str, tail: bytes) -> bytes:
    """The WebSocket frame of a MESSAGE for one subscription."""
    return data_frame(b"MESSAGE\n" + encode_header("subscription", subscription_id) + tail)


def message_tail(stored: Stored) -> bytes:
    """Every header but `subscription`, the blank line, the body and the NUL."""
    headers = [
        encode_header("destination", stored.destination),
        encode_header("message-id", f"{stored.epoch}-{stored.offset}"),
        encode_header("content-type", stored.content_type),
        encode_header("content-length", str(len(stored.body))),
        encode_header("sender", stored.sender),
        encode_header("timestamp", str(stored.timestamp_ms)),
        encode_header("offset", str(stored.offset)),
        encode_header("epoch", stored.epoch),
    ]
    headers.extend(encode_header(name, value) for name, value in stored.headers)
    return b"".join(headers) + b"\n" + stored.body + b"\x00"
