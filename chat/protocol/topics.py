"""Destinations (PROTOCOL.md §4, §10, §11) and wildcard subscriptions.

A topic destination is `/topic/` plus dot-separated segments of `[A-Za-z0-9_-]`; a
subscription pattern may also use `*` (exactly one segment) and `#` (zero or more).
`/user/NAME` is NAME's inbox and `/presence/ROOM` the members of `/topic/ROOM`;
`parse_route` tells the three apart.

How matching works: patterns live in a trie keyed by segment, with `*` and `#`
as ordinary child keys. `match()` walks the topic with a stack of (node, index)
states: a literal child and a `*` child each consume one segment; a `#` child
resumes at every index from here to the end (a trailing `#`, the common case,
just takes its values). Without `#` each node is reached at most once; `#` states
are deduplicated, which makes every node (one per pattern) reached at most once
at the topic's end, so a value is returned once per pattern.
"""

from __future__ import annotations

import re
from typing import Final, Generic, NamedTuple, NoReturn, TypeVar

from chat.protocol.errors import InvalidDestination
from chat.protocol.wire import IDENTITY

TOPIC_PREFIX = "/topic/"
USER_PREFIX = "/user/"  # §10: an identity's inbox
PRESENCE_PREFIX = "/presence/"  # §11: who is in a room
TOPIC: Final = "topic"  # the spaces of a Route
USER: Final = "user"
PRESENCE: Final = "presence"
MAX_DESTINATION_LENGTH = 255  # a name, not a payload; bounds per-message parsing and trie depth
MAX_SEGMENTS = 32  # deep enough for any hierarchy; bounds the `#` fan-out of match()
_QUOTED_CHARS = 60  # error messages quote at most this much of a destination

ONE = "*"  # wildcard: exactly one segment
ANY = "#"  # wildcard: zero or more segments
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_CONCRETE_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")

V = TypeVar("V")


def parse_destination(destination: str, *, wildcards: bool) -> tuple[str, ...]:
    """The segments of `/topic/a.b` as `("a", "b")`, else `InvalidDestination` saying why.

    `wildcards` allows `*` and `#` segments (subscriptions, not SEND).
    """
    if len(destination) > MAX_DESTINATION_LENGTH:
        _refuse(destination, f"longer than {MAX_DESTINATION_LENGTH} characters")
    if not destination.startswith(TOPIC_PREFIX):
        _refuse(
            destination,
            f"destination must start with {TOPIC_PREFIX}, {USER_PREFIX} or {PRESENCE_PREFIX}",
        )
    name = destination[len(TOPIC_PREFIX) :]
    if _CONCRETE_NAME.fullmatch(name) is None:
        _check_segments(destination, name.split("."), wildcards)
    segments = tuple(name.split("."))
    if len(segments) > MAX_SEGMENTS:
        _refuse(destination, f"more than {MAX_SEGMENTS} segments")
    return segments


class Route(NamedTuple):
    """A destination parsed: its space (TOPIC, USER or PRESENCE) and its segments (a topic
    pattern, the inbox owner's name as one segment, or the room's topic)."""

    space: str
    pattern: tuple[str, ...]


def parse_route(destination: str, *, wildcards: bool) -> Route:
    """The Route of any destination, else `InvalidDestination` saying why; `wildcards`
    allows `*` and `#` in a topic pattern (never in an inbox or a presence room)."""
    if destination.startswith(USER_PREFIX):
        name = destination[len(USER_PREFIX) :]
        if IDENTITY.fullmatch(name) is None:
            _refuse(destination, "an inbox is /user/NAME, NAME 1-64 of A-Z a-z 0-9 _ . @ -")
        return Route(USER, (name,))
    if destination.startswith(PRESENCE_PREFIX):
        room = TOPIC_PREFIX + destination[len(PRESENCE_PREFIX) :]
        return Route(PRESENCE, parse_destination(room, wildcards=False))
    return Route(TOPIC, parse_destination(destination, wildcards=wildcards))


def is_exact(pattern: tuple[str, ...]) -> bool:
    """No wildcard segment: the pattern names one topic."""
    return ANY not in pattern and ONE not in pattern


def _check_segments(destination: str, segments: list[str], wildcards: bool) -> None:
    """Find the rule a non-trivial name breaks (or accept its wildcards)."""
    if segments == [""]:
        _refuse(destination, f"no topic name after {TOPIC_PREFIX}")
    for segment in segments:
        if not segment:
            _refuse(destination, "empty segment (segments are separated by single dots)")
        if segment in (ONE, ANY):
            if not wildcards:
                _refuse(destination, "wildcards (* and #) are not allowed in SEND destinations")
        elif _SEGMENT.fullmatch(segment) is None:
            _refuse(
                destination,
                f"segment {segment[:_QUOTED_CHARS]!r} may only contain A-Z a-z 0-9 _ -"
                + (" or be exactly * or #" if wildcards else ""),
            )


def _refuse(destination: str, rule: str) -> NoReturn:
    quoted = destination[:_QUOTED_CHARS] + ("..." if len(destination) > _QUOTED_CHARS else "")
    raise InvalidDestination(f"invalid destination {quoted!r}: {rule}")


class _Node(Generic[V]):
    """One trie node: children by segment (`*` and `#` included) and the values ending here."""

    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.values: dict[V, None] = {}  # insertion-ordered set


class TopicTrie(Generic[V]):
    """Subscriptions by pattern; match() returns every value whose pattern matches a topic."""

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._size = 0

    def __len__(self) -> int:
        """The number of (pattern, value) entries."""
        return self._size

    def add(self, pattern: tuple[str, ...], value: V) -> None:
        """Register `value` under `pattern`; adding the same pair twice keeps one entry."""
        node = self._root
        for segment in pattern:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Node()
            node = child
        if value not in node.values:
            node.values[value] = None
            self._size += 1

    def discard(self, pattern: tuple[str, ...], value: V) -> None:
        """Remove `value` from `pattern` if present, pruning nodes left empty."""
        path = [self._root]
        for segment in pattern:
            child = path[-1].children.get(segment)
            if child is None:
                return
            path.append(child)
        if path[-1].values.pop(value, _ABSENT) is _ABSENT:
            return
        self._size -= 1
        for depth in range(len(pattern), 0, -1):
            node = path[depth]
            if node.values or node.children:
                break
            del path[depth - 1].children[pattern[depth - 1]]

    def match(self, topic: tuple[str, ...]) -> list[V]:
        """Every value whose pattern matches `topic`, once per pattern.

        `topic` is concrete (from `parse_destination(..., wildcards=False)`): a literal
        `*` or `#` segment in it would be taken for the wildcard.
        """
        found: list[V] = []
        end = len(topic)
        stack = [(self._root, 0)]
        seen: set[object] = set()  # `#` nodes and states already taken
        while stack:
            node, index = stack.pop()
            children = node.children
            if index == end:
                found.extend(node.values)
            elif children:
                child = children.get(topic[index])
                if child is not None:
                    stack.append((child, index + 1))
                child = children.get(ONE)
                if child is not None:
                    stack.append((child, index + 1))
            child = children.get(ANY)
            if child is not None:
                _enter_any(child, index, end, stack, found, seen)
        return found


def _enter_any(
    node: _Node[V],
    index: int,
    end: int,
    stack: list[tuple[_Node[V], int]],
    found: list[V],
    seen: set[object],
) -> None:
    """Step into a `#` node, which consumes zero or more segments from `index` on."""
    if not node.children:  # a trailing `#` matches whatever remains: take its values once
        if id(node) not in seen:
            seen.add(id(node))
            found.extend(node.values)
        return
    for resume in range(index, end + 1):
        state = (id(node), resume)
        if state not in seen:
            seen.add(state)
            stack.append((node, resume))


_ABSENT = object()
