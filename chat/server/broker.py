"""Subscriptions and fan-out.

How this works: a published message is encoded once. A STOMP `MESSAGE` differs between
recipients only in its `subscription` header, so the frame is built as
`MESSAGE\\n` + `subscription:ID\\n` + common headers and body, and the finished WebSocket
frame is cached per distinct subscription id for the duration of one publish (clients
tend to reuse the same few ids, so most recipients share one bytes object). Each
recipient's `Outbox` only appends those bytes to its buffer: a publisher never waits on
a subscriber.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Protocol

from chat.stomp import encode_header
from chat.topics import TopicTrie
from chat.wsframes import data_frame


class Outbox(Protocol):
    """A connection's outbound side, as far as fan-out is concerned."""

    def push(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Subscription:
    outbox: Outbox
    id: str


@dataclass(frozen=True, slots=True)
class Published:
    """What the broker needs of a SEND, already validated by the session."""

    destination: str
    topic: tuple[str, ...]
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
    }
)


class Broker:
    """Holds every subscription in one topic trie and delivers published messages."""

    def __init__(self) -> None:
        self._trie: TopicTrie[Subscription] = TopicTrie()
        self._ids = itertools.count(1)

    def subscribe(self, pattern: tuple[str, ...], subscription: Subscription) -> None:
        self._trie.add(pattern, subscription)

    def unsubscribe(self, pattern: tuple[str, ...], subscription: Subscription) -> None:
        self._trie.discard(pattern, subscription)

    def __len__(self) -> int:
        return len(self._trie)

    def publish(self, message: Published) -> int:
        """Deliver to every matching subscription; returns how many deliveries were queued."""
        recipients = self._trie.match(message.topic)
        if not recipients:
            return 0
        tail = _common_part(message, next(self._ids))
        frames: dict[str, bytes] = {}
        for sub in recipients:
            frame = frames.get(sub.id)
            if frame is None:
                frame = frames[sub.id] = data_frame(
                    b"MESSAGE\n" + encode_header("subscription", sub.id) + tail
                )
            sub.outbox.push(frame)
        return len(recipients)


def _common_part(message: Published, message_id: int) -> bytes:
    headers = [
        encode_header("destination", message.destination),
        encode_header("message-id", str(message_id)),
        encode_header("content-type", message.content_type),
        encode_header("content-length", str(len(message.body))),
        encode_header("sender", message.sender),
        encode_header("timestamp", str(time.time_ns() // 1_000_000)),
    ]
    headers.extend(encode_header(name, value) for name, value in message.extra_headers)
    return b"".join(headers) + b"\n" + message.body + b"\x00"
