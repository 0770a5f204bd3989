"""What our identity may do (PROTOCOL.md §9), asked of the server before doing it.

The server answers a forbidden SUBSCRIBE or SEND with `ERROR message:forbidden` and closes
the connection: the chat would lose every room for one wrong `/join`. So the client asks
first (`GET /auth/me`) and says no itself, with the server's own containment check for
subscriptions (`chat.protocol.policy.contains`: `dev.*` is inside `dev.#`, `#` inside only
`#`). The server stays the judge: these checks only spare the connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from chat.client.errors import BadResponse, refusal
from chat.client.http import Dial, request_json
from chat.client.tls import open_tls_stream
from chat.protocol.errors import InvalidDestination
from chat.protocol.policy import EVERYONE, contains
from chat.protocol.topics import TOPIC_PREFIX, TopicTrie, parse_destination

ME_PATH = "/auth/me"  # PROTOCOL.md §1, §9


@dataclass(frozen=True, slots=True)
class Rights:
    """GET /auth/me: topic patterns under /topic/ (`{sub}` already expanded), whom we may
    send direct messages, whether we are an admin."""

    sub: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    message: tuple[str, ...]
    admin: bool
    _readable: tuple[tuple[str, ...], ...] = field(repr=False, compare=False)
    _writable: TopicTrie[str] = field(repr=False, compare=False)

    @classmethod
    def of(cls, payload: dict[str, Any]) -> Rights:
        """From the JSON answer; `BadResponse` when it is not what §9 describes."""
        sub, admin = payload.get("sub"), payload.get("admin")
        if not isinstance(sub, str) or not isinstance(admin, bool):
            raise BadResponse(f"{ME_PATH} answered without a 'sub' name or an 'admin' boolean")
        subscribe, publish, message = (
            _strings(payload, key) for key in ("subscribe", "publish", "message")
        )
        readable = tuple(_pattern(pattern) for pattern in subscribe)
        return cls(sub, subscribe, publish, message, admin, readable, _trie(publish))

    def may_join(self, room: str) -> bool:
        """Whether `room` (wildcards allowed) may be subscribed: every topic it can match
        is granted."""
        return contains(self._readable, parse_destination(TOPIC_PREFIX + room, wildcards=True))

    def may_publish(self, room: str) -> bool:
        """Whether a SEND to plain `room` is allowed."""
        return bool(self._writable.match(parse_destination(TOPIC_PREFIX + room, wildcards=False)))

    def may_message(self, name: str) -> bool:
        """Whether a direct message to `name` is allowed."""
        return EVERYONE in self.message or name in self.message


async def fetch_rights(
    base_url: str, ssl_context: ssl.SSLContext, *, dial: Dial = open_tls_stream
) -> Rights:
    """GET /auth/me with our certificate; a refusal raises its `ClientError`."""
    status, payload = await request_json(base_url, "GET", ME_PATH, ssl_context, dial=dial)
    if status != 200:
        raise refusal(status, payload)
    return Rights.of(payload)


def _strings(payload: dict[str, Any], key: str) -> tuple[str, ...]:
    value = payload.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadResponse(f"{ME_PATH} answered a '{key}' that is not a list of strings")
    return tuple(value)


def _trie(patterns: tuple[str, ...]) -> TopicTrie[str]:
    """The patterns, matchable against a topic."""
    trie: TopicTrie[str] = TopicTrie()
    for pattern in patterns:
        trie.add(_pattern(pattern), pattern)
    return trie


def _pattern(pattern: str) -> tuple[str, ...]:
    """A granted topic pattern's segments; `BadResponse` for one no server should grant."""
    try:
        return parse_destination(TOPIC_PREFIX + pattern, wildcards=True)
    except InvalidDestination as exc:
        raise BadResponse(f"{ME_PATH} answered an unusable topic pattern: {exc}") from None
