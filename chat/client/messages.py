"""What a chat client receives, as values: messages, where they sit in history, subscriptions,
who is in a room."""

from __future__ import annotations

import json
from dataclasses import dataclass

from chat.protocol.errors import MalformedFrame
from chat.protocol.stomp import Frame
from chat.protocol.topics import PRESENCE_PREFIX, USER_PREFIX


def inbox(name: str) -> str:
    """NAME's inbox (PROTOCOL.md §10): where direct messages to NAME go, and NAME reads them."""
    return USER_PREFIX + name


def presence(room: str) -> str:
    """Where the members of ROOM, a plain room, are announced (PROTOCOL.md §11)."""
    return PRESENCE_PREFIX + room


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
    to: str | None = None  # a direct message's recipient (PROTOCOL.md §10)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @classmethod
    def of(cls, frame: Frame) -> Message:
        """From a MESSAGE frame; raises `StompProtocolError` for one PROTOCOL.md §4 forbids.

        Presence news (§11) comes from the server itself: no sender, no timestamp (0).
        """
        destination = frame.require("destination")
        if destination.startswith(PRESENCE_PREFIX):
            sender, timestamp = "", "0"
        else:
            sender, timestamp = frame.require("sender"), frame.require("timestamp")
        return cls(
            destination,
            frame.require("subscription"),
            frame.require("message-id"),
            sender,
            _number(timestamp, "timestamp"),
            frame.body,
            frame.headers,
            Position.of(frame),
            to=frame.get("to"),
        )

    @property
    def direct(self) -> bool:
        """A direct message, in the inbox of one of its two parties."""
        return self.destination.startswith(USER_PREFIX)

    def other_party(self, me: str) -> str:
        """Whom a direct message is a conversation with, seen by `me`: the sender, or for
        our own copy the recipient (ourselves for a note to self)."""
        if self.sender == me and self.to is not None:
            return self.to
        return self.sender


@dataclass(frozen=True, slots=True)
class Presence:
    """Who is in a room (PROTOCOL.md §11): a snapshot first, then one join or leave each."""

    room: str
    change: str  # "snapshot", "join" or "leave"
    names: tuple[str, ...]  # every member (snapshot), or who joined or left

    @classmethod
    def of(cls, message: Message) -> Presence:
        """From a MESSAGE of a /presence/ROOM subscription; `MalformedFrame` for a bad one."""
        change = next((value for key, value in message.headers if key == "presence"), None)
        try:
            body = json.loads(message.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict):
            raise MalformedFrame("a presence MESSAGE without a JSON object body")
        room = message.destination.removeprefix(PRESENCE_PREFIX)
        if change == "snapshot":
            return cls(room, change, _names(body.get("members")))
        if change in ("join", "leave"):
            return cls(room, change, _names([body.get("who")]))
        raise MalformedFrame(f"unknown presence change {str(change)[:20]!r}")


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


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise MalformedFrame("a presence MESSAGE whose names are not a list of strings")
    return tuple(value)


def _number(value: str, name: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise MalformedFrame(f"MESSAGE {name} {value[:20]!r} is not a number")
    return int(value)
