"""What a chat client receives, as values: messages, where they sit in history, subscriptions."""

from __future__ import annotations

from dataclasses import dataclass

from chat.protocol.errors import MalformedFrame
from chat.protocol.stomp import Frame


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
        """From a MESSAGE frame; raises `StompProtocolError` for one PROTOCOL.md §4 forbids."""
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

    @classmethod
    def of(cls, sub_id: str, receipt: Frame | None) -> Subscribed:
        """From the SUBSCRIBE's RECEIPT (None when none was asked for)."""
        if receipt is None:
            return cls(sub_id, None, None)
        recovered = receipt.get("recovered")
        return cls(sub_id, Position.of(receipt), None if recovered is None else recovered == "true")


def _number(value: str, name: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise MalformedFrame(f"MESSAGE {name} {value[:20]!r} is not a number")
    return int(value)
