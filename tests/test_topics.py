"""Destination rules and wildcard matching, checked against a plain recursive matcher."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.protocol.errors import CloseCode, InvalidDestination
from chat.protocol.topics import (
    MAX_DESTINATION_LENGTH,
    MAX_SEGMENTS,
    TOPIC_PREFIX,
    TopicTrie,
    parse_destination,
)


def reference_match(pattern: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """The matching rule written the obvious (exponential) way."""
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(reference_match(rest, topic[i:]) for i in range(len(topic) + 1))
    return bool(topic) and head in ("*", topic[0]) and reference_match(rest, topic[1:])


def split(name: str) -> tuple[str, ...]:
    return tuple(name.split("."))


@pytest.mark.parametrize(
    ("destination", "wildcards", "expected"),
    [
        ("/topic/a", False, ("a",)),
        ("/topic/room-1.Chat_2.x", False, ("room-1", "Chat_2", "x")),
        ("/topic/a.*.#", True, ("a", "*", "#")),
        ("/topic/#", True, ("#",)),
        ("/topic/*", True, ("*",)),
        ("/topic/a.b", True, ("a", "b")),
        (TOPIC_PREFIX + "a" * 248, False, ("a" * 248,)),  # exactly MAX_DESTINATION_LENGTH
        (TOPIC_PREFIX + ".".join("a" * MAX_SEGMENTS), False, ("a",) * MAX_SEGMENTS),
    ],
)
def test_parse_valid(destination: str, wildcards: bool, expected: tuple[str, ...]) -> None:
    assert len(TOPIC_PREFIX + "a" * 248) == MAX_DESTINATION_LENGTH
    assert parse_destination(destination, wildcards=wildcards) == expected


@pytest.mark.parametrize(
    ("destination", "wildcards", "rule"),
    [
        ("/queue/a", True, "destination must start with /topic/"),
        ("topic/a", True, "destination must start with /topic/"),
        ("/TOPIC/a", True, "destination must start with /topic/"),
        ("", True, "destination must start with /topic/"),
        ("/topic/", True, "no topic name after /topic/"),
        ("/topic/a..b", True, "empty segment"),
        ("/topic/.a", False, "empty segment"),
        ("/topic/a.", False, "empty segment"),
        ("/topic/a b", False, "segment 'a b' may only contain A-Z a-z 0-9 _ -"),
        ("/topic/a/b", False, "segment 'a/b' may only contain"),
        ("/topic/café", False, "segment 'café' may only contain"),
        ("/topic/a\n", False, "may only contain"),
        ("/topic/a*", True, "segment 'a*' may only contain A-Z a-z 0-9 _ - or be exactly * or #"),
        ("/topic/##", True, "segment '##' may only contain"),
        ("/topic/a.*", False, "wildcards (* and #) are not allowed in SEND destinations"),
        ("/topic/#", False, "wildcards (* and #) are not allowed in SEND destinations"),
        ("/topic/" + "a" * 249, True, f"longer than {MAX_DESTINATION_LENGTH} characters"),
        ("/topic/" + ".".join("a" * (MAX_SEGMENTS + 1)), True, f"more than {MAX_SEGMENTS}"),
    ],
)
def test_parse_refused(destination: str, wildcards: bool, rule: str) -> None:
    with pytest.raises(InvalidDestination) as info:
        parse_destination(destination, wildcards=wildcards)
    message = str(info.value)
    assert rule in message
    assert repr(destination[:20])[:-1] in message  # names the destination
    assert info.value.close_code == CloseCode.POLICY


MATCHES = [
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a", False),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("*.*", "a", False),
    ("*.*", "a.b", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b", False),
    ("a.#", "b.a", False),
    ("#.z", "z", True),
    ("#.z", "a.z", True),
    ("#.z", "a.b.z", True),
    ("#.z", "z.a", False),
    ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.c.z", True),
    ("a.#.z", "a.b", False),
    ("a.#.z", "z", False),
    ("a.#.z", "a.z.b", False),
    ("#.#", "a", True),
    ("#.#", "a.b.c", True),
    ("a.#.#", "a", True),
    ("*.#", "a", True),
    ("*.#", "a.b.c", True),
    ("#.*", "a", True),
    ("#.*", "a.b", True),
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("#.a.#", "b.a.c", True),
    ("#.a.#", "a", True),
    ("#.a.#", "x.b.y", False),
    ("#.a.*", "a", False),
    ("#.a.*", "x.a.y", True),
]


@pytest.mark.parametrize(("pattern", "topic", "matches"), MATCHES)
def test_match_table(pattern: str, topic: str, matches: bool) -> None:
    assert reference_match(split(pattern), split(topic)) == matches  # the table itself is right
    trie: TopicTrie[str] = TopicTrie()
    trie.add(split(pattern), "v")
    assert trie.match(split(topic)) == (["v"] if matches else [])


def test_match_collects_every_matching_pattern() -> None:
    trie: TopicTrie[str] = TopicTrie()
    for pattern in ("a.b", "a.*", "a.#", "#", "*.c", "b.#"):
        trie.add(split(pattern), pattern)
    assert sorted(trie.match(("a", "b"))) == ["#", "a.#", "a.*", "a.b"]
    assert sorted(trie.match(("a",))) == ["#", "a.#"]
    assert trie.match(("x",)) == ["#"]


def test_value_once_per_pattern() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add(split("#.#.#"), "s")  # many ways to split a.b.c, still one delivery
    trie.add(split("a.#"), "s")
    trie.add(split("a.#"), "s")  # the same entry twice is one entry
    assert len(trie) == 2
    assert trie.match(split("a.b.c")) == ["s", "s"]


def test_add_discard_and_prune() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add(("a", "b"), "x")
    trie.add(("a", "b"), "y")
    trie.add(("a",), "z")
    assert len(trie) == 3
    trie.discard(("a", "b"), "x")
    trie.discard(("a", "b"), "x")  # absent value: no error
    trie.discard(("a", "c"), "y")  # absent pattern: no error
    trie.discard(("a", "b", "c"), "y")  # past the end of the trie: no error
    assert len(trie) == 2
    assert trie.match(("a", "b")) == ["y"]
    trie.discard(("a", "b"), "y")
    assert trie._root.children["a"].children == {}  # the emptied "b" node is gone
    trie.discard(("a",), "z")
    assert trie._root.children == {}
    assert len(trie) == 0
    assert trie.match(("a",)) == []


def test_discard_keeps_nodes_still_in_use() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add(("a", "#"), "x")
    trie.add(("a", "#", "b"), "y")
    trie.discard(("a", "#"), "x")
    assert trie.match(("a", "q", "b")) == ["y"]
    trie.discard(("a", "#", "b"), "y")
    assert trie._root.children == {}


PATTERNS = st.lists(st.sampled_from(["a", "b", "*", "#"]), min_size=1, max_size=4).map(tuple)
TOPICS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6).map(tuple)


@given(
    entries=st.lists(st.tuples(PATTERNS, st.integers(0, 3)), max_size=12),
    removed=st.lists(st.tuples(PATTERNS, st.integers(0, 3)), max_size=6),
    topics=st.lists(TOPICS, min_size=1, max_size=5),
)
def test_trie_agrees_with_reference(
    entries: list[tuple[tuple[str, ...], int]],
    removed: list[tuple[tuple[str, ...], int]],
    topics: list[tuple[str, ...]],
) -> None:
    trie: TopicTrie[int] = TopicTrie()
    for pattern, value in entries:
        trie.add(pattern, value)
    for pattern, value in removed:
        trie.discard(pattern, value)
    live = set(entries) - set(removed)
    assert len(trie) == len(live)
    for topic in topics:
        expected = Counter(value for pattern, value in live if reference_match(pattern, topic))
        assert Counter(trie.match(topic)) == expected
