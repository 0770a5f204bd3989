"""Who is in each room and who watches it (PROTOCOL.md §11), as plain values: no trio, no I/O.

How this works: a member of ROOM is an identity with at least one live subscription to exactly
`/topic/ROOM`, on any connection. The session calls `join` once per such subscription and
`leave` once when it ends; an identity's subscriptions are counted, so only its first join
and its last leave are changes (three connections of alice are one member). A watcher, a
subscription to `/presence/ROOM`, gets its snapshot pushed by `watch` itself, synchronously,
so every change pushed later lands after it in the same outbox. A change is encoded once, as
the tail of a MESSAGE; per watcher only the `subscription` line differs, as in the broker's
fan-out. A room with neither members nor watchers leaves no state behind.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

from chat.protocol.stomp import encode_header
from chat.protocol.topics import PRESENCE_PREFIX
from chat.server.broker import Subscription, message_frame

PRESENCE_CONTENT_TYPE = "application/json"

log = logging.getLogger("chat.server")

# Unique per server process, and never equal to a history's `<hex epoch>-<offset>` id.
_message_ids = itertools.count(1)


class Presence:
    """Who is in each room, counted per identity, and who watches each room."""

    def __init__(self) -> None:
        # room -> identity -> live subscriptions to /topic/ROOM (never 0: the entry goes first)
        self._members: dict[str, dict[str, int]] = {}
        # room -> its watchers, as an insertion-ordered set (deliveries follow watch order)
        self._watchers: dict[str, dict[Subscription, None]] = {}

    def join(self, room: str, identity: str) -> None:
        """One more live subscription of `identity` to /topic/ROOM; the first one is a `join`."""
        counts = self._members.setdefault(room, {})
        count = counts.get(identity, 0)
        counts[identity] = count + 1
        if count == 0:
            self._notify(room, "join", identity)

    def leave(self, room: str, identity: str) -> None:
        """One fewer live subscription of `identity` to /topic/ROOM; the last one is a `leave`.

        A leave without a matching join is the caller's bug, but must not take a session
        down with it: it changes nothing (no KeyError, a count never goes below zero, no
        event) and is logged as a warning rather than ignored.
        """
        counts = self._members.get(room, {})
        count = counts.get(identity, 0)
        if count == 0:
            log.warning(
                "presence: leave of %r from room %r, which it had not joined",
                identity,
                room,
                extra={"event": "presence_leave_unjoined", "sub": identity, "room": room},
            )
            return
        if count > 1:
            counts[identity] = count - 1
            return
        del counts[identity]
        if not counts:
            del self._members[room]
        self._notify(room, "leave", identity)

    def watch(self, room: str, subscription: Subscription) -> None:
        """Register a watcher of ROOM and push its snapshot now, ahead of any later change."""
        body = {"room": room, "members": self.members(room)}
        subscription.outbox.push(message_frame(subscription.id, _tail(room, "snapshot", body)))
        self._watchers.setdefault(room, {})[subscription] = None

    def unwatch(self, room: str, subscription: Subscription) -> None:
        """Stop pushing ROOM's changes to `subscription`; unknown watchers are ignored."""
        watchers = self._watchers.get(room)
        if watchers is None:
            return
        watchers.pop(subscription, None)
        if not watchers:
            del self._watchers[room]

    def members(self, room: str) -> list[str]:
        """The identities now in ROOM, sorted."""
        return sorted(self._members.get(room, ()))

    def _notify(self, room: str, kind: str, identity: str) -> None:
        watchers = self._watchers.get(room)
        if not watchers:
            return
        tail = _tail(room, kind, {"room": room, "who": identity})
        frames: dict[str, bytes] = {}  # clients reuse a few ids: most watchers share one frame
        for sub in tuple(watchers):  # a copy: an outbox may unwatch while we deliver
            frame = frames.get(sub.id)
            if frame is None:
                frame = frames[sub.id] = message_frame(sub.id, tail)
            sub.outbox.push(frame)


def _tail(room: str, kind: str, body: dict[str, Any]) -> bytes:
    """Every header of a presence MESSAGE but `subscription`, the blank line, the body, NUL."""
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    headers = [
        encode_header("destination", PRESENCE_PREFIX + room),
        encode_header("message-id", f"p-{next(_message_ids)}"),
        encode_header("content-type", PRESENCE_CONTENT_TYPE),
        encode_header("content-length", str(len(data))),
        encode_header("presence", kind),
    ]
    return b"".join(headers) + b"\n" + data + b"\x00"
