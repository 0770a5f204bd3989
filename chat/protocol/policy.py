"""Authorization policy (PROTOCOL.md §9): who may subscribe, publish, message and administer.

A policy is a TOML file of `[groups]` and `[[rule]]` tables. Rules only grant: an identity's
rights are the union over the rules whose `who` covers it, with `{sub}` in topic patterns
replaced by the identity and `@GROUP` in `message` replaced by the group's members.

How subscription containment works: a pattern is allowed when every topic it matches is
matched by some grant. Each pattern is a small NFA whose state is the number of segments
consumed (`#` loops on its state and may also be skipped). Segments are the letters: each
literal named by the pattern or a grant is a letter of its own, and one more letter, OTHER,
stands for every other segment, which no pattern tells apart. A breadth-first walk over nodes
(one state of the pattern, the set of states of the grants' union, as the subset construction
builds it on the fly) looks for a topic the pattern accepts and no grant does. A node whose
grant states include those of a node already met with the same pattern state, no deeper, can
lead to no topic the earlier one does not (an antichain), so it is skipped: the walk stays
small even for grants like `#.a.*.*.*`. Each node is met at the depth of the shortest topic
reaching it, so the walk stops at MAX_SEGMENTS: no topic is longer.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from chat.protocol.topics import ANY, MAX_SEGMENTS, ONE, TOPIC_PREFIX
from chat.protocol.wire import IDENTITY

SUB = "{sub}"  # in a topic pattern: the identity whose rights are computed
EVERYONE = "*"  # in `who` and `message`: every identity
GROUP_PREFIX = "@"  # in `who` and `message`: `@GROUP` is the group's members
_RULE_KEYS = ("who", "subscribe", "publish", "message", "admin")

# The certificate identity of §9 (pki.CLIENT_NAME_RE holds certificates to the same rule).
_IDENTITY_RULE = "1-64 characters of A-Z a-z 0-9 _ . @ -"
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_PLACEHOLDER = "x"  # stands for the identity while a pattern with {sub} is checked
_QUOTED_CHARS = 60  # error messages quote at most this much of a value
_CACHED_IDENTITIES = 4096  # a bound on the rights cache; identities beyond it start it afresh
_OTHER = None  # the letter for every segment that no pattern in a containment check names

DEFAULT_POLICY = """\
# Who may read and write which room (PROTOCOL.md section 9).
#
# Rules grant: nothing is allowed that no rule grants, and a key a rule leaves out grants
# nothing. An identity (its certificate's CN) gets the union of every rule whose `who` covers it.
#
# [groups]              NAME = ["identity", ...]
# [[rule]]              one table per rule, with the keys:
#   who       = [...]   "*" (every identity), "NAME" (one identity) or "@GROUP" (its members)
#   subscribe = [...]   topic patterns, without /topic/: dot-separated segments, where "*" is
#                       exactly one segment and "#" zero or more ("dev.#" is dev and all below
#                       it); "{sub}" is the identity itself ("team.{sub}.#"). A subscription
#                       is allowed when every topic it can match is granted here.
#   publish   = [...]   topic patterns the identity may send to
#   message   = [...]   whom it may send direct messages: "*", "NAME" or "@GROUP"
#   admin     = true    may use the admin routes
#
# For example, members of ops read every room, write ops.* and the lobby, and administer:
#
# [groups]
# ops = ["alice", "carol"]
#
# [[rule]]
# who = ["@ops"]
# subscribe = ["#"]
# publish = ["ops.#", "lobby"]
# admin = true

[[rule]]
who = ["*"]
subscribe = ["#"]
publish = ["#"]
message = ["*"]
"""


class PolicyError(ValueError):
    """A policy file that cannot be used: one line naming the file, the line when known, and
    the problem (the server's start turns it into exit code 2)."""


@dataclass(frozen=True, slots=True)
class Rights:
    """What one identity may do, `{sub}` and `@GROUP` already expanded (GET /auth/me)."""

    sub: str
    subscribe: tuple[str, ...]  # topic patterns without /topic/
    publish: tuple[str, ...]
    message: tuple[str, ...]  # "*" or identities
    admin: bool
    named: bool  # some rule applies: its `who` covers this identity ("*" included)

    def may_subscribe(self, pattern: tuple[str, ...]) -> bool:
        """Whether every topic `pattern` can match is granted by a subscribe pattern."""
        return contains(_segments(self.subscribe), pattern)

    def may_publish(self, topic: tuple[str, ...]) -> bool:
        """Whether some publish pattern matches the concrete `topic`."""
        return _Union(_segments(self.publish)).matches(topic)

    def may_message(self, name: str) -> bool:
        """Whether a direct message to identity `name` is granted."""
        return EVERYONE in self.message or name in self.message

    def as_json(self) -> dict[str, object]:
        """The body of GET /auth/me."""
        return {
            "sub": self.sub,
            "subscribe": list(self.subscribe),
            "publish": list(self.publish),
            "message": list(self.message),
            "admin": self.admin,
        }


class Policy:
    """A parsed policy; immutable, so the rights of each identity are computed once."""

    __slots__ = ("_cache", "_rules")

    def __init__(self, rules: Iterable[_Rule]) -> None:
        self._rules = tuple(rules)
        self._cache: dict[str, Rights] = {}

    @classmethod
    def parse(cls, text: str, source: str) -> Policy:
        """The policy in TOML `text`; `source` names the file in a PolicyError."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(_decode_error(source, text, str(exc))) from None
        except RecursionError:
            raise PolicyError(f"{source}: values nested too deeply") from None
        try:
            return cls(_parse_document(document))
        except _Problem as problem:
            line = _locate(text, problem.table, problem.index, problem.key)
            raise PolicyError(_one_line(source, line, problem.message)) from None

    @classmethod
    def load(cls, path: Path) -> Policy:
        """The policy in the file at `path` (UTF-8); any failure is a PolicyError naming it."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8-sig")  # an editor's byte-order mark is not an error
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise PolicyError(f"{path}:{line}: not UTF-8 text") from None
        return cls.parse(text, str(path))

    def rights(self, identity: str) -> Rights:
        """The rights of `identity`. A name no certificate can carry gets none: its `*` or `#`
        would become wildcards in `{sub}`."""
        rights = self._cache.get(identity)
        if rights is None:
            if len(self._cache) >= _CACHED_IDENTITIES:
                self._cache.clear()
            rules = self._rules if IDENTITY.fullmatch(identity) else ()
            rights = self._cache[identity] = _rights_of(identity, rules)
        return rights


def contains(grants: Iterable[tuple[str, ...]], pattern: tuple[str, ...]) -> bool:
    """Whether every topic `pattern` matches is matched by one of `grants` (segment tuples)."""
    inner, outer = _Union([pattern]), _Union(grants)
    letters: list[str | None] = [*sorted(inner.literals() | outer.literals()), _OTHER]
    frontier = [(state, outer.start()) for state in inner.start()]  # the empty topic: no topic
    seen: dict[_State, list[frozenset[_State]]] = {}  # grant state sets met with each state
    for _length in range(MAX_SEGMENTS):  # each round is one segment longer
        moves = sorted(  # fewer grant states first: they subsume their supersets
            (move for node in frontier for move in _moves(inner, outer, letters, node)),
            key=lambda move: len(move[1]),
        )
        frontier = []
        for state, granted in moves:
            if any(earlier <= granted for earlier in seen.get(state, ())):
                continue
            if inner.final(state) and not outer.accepts(granted):
                return False
            seen.setdefault(state, []).append(granted)
            frontier.append((state, granted))
    return True


def _moves(inner: _Union, outer: _Union, letters: list[str | None], node: _Node) -> Iterator[_Node]:
    """The nodes one segment on from `node`. The pattern is walked state by state, as a client
    writes it and determinizing `#.a.*.*.*` would be exponential; the grants as state sets."""
    mine, theirs = node
    for letter in letters:
        moved = inner.step(frozenset([mine]), letter)
        if moved:
            granted = outer.step(theirs, letter)
            yield from ((state, granted) for state in moved)


_State = tuple[int, int]  # (which pattern, how many of its segments are consumed)
_Node = tuple[_State, frozenset[_State]]  # a pattern state and the grants' states, same topic


class _Union:
    """The NFA of a union of patterns; a frozenset of states is one state of its DFA."""

    __slots__ = ("_patterns",)

    def __init__(self, patterns: Iterable[tuple[str, ...]]) -> None:
        self._patterns = tuple(patterns)

    def literals(self) -> set[str]:
        """The segments the patterns name (wildcards are not letters)."""
        return {s for pattern in self._patterns for s in pattern if s not in (ONE, ANY)}

    def start(self) -> frozenset[_State]:
        return self._close((index, 0) for index in range(len(self._patterns)))

    def step(self, states: frozenset[_State], letter: str | None) -> frozenset[_State]:
        """The states after one more segment, `letter` (_OTHER: a segment no pattern names)."""
        moved = []
        for index, done in states:
            pattern = self._patterns[index]
            if done < len(pattern):
                segment = pattern[done]
                if segment == ANY:
                    moved.append((index, done))
                elif segment in (ONE, letter):
                    moved.append((index, done + 1))
        return self._close(moved)

    def final(self, state: _State) -> bool:
        index, done = state
        return done == len(self._patterns[index])

    def accepts(self, states: frozenset[_State]) -> bool:
        return any(self.final(state) for state in states)

    def matches(self, topic: tuple[str, ...]) -> bool:
        """Whether some pattern matches the concrete `topic`."""
        states = self.start()
        for segment in topic:
            states = self.step(states, segment)
        return self.accepts(states)

    def _close(self, states: Iterable[_State]) -> frozenset[_State]:
        """`states` and those reached by letting a `#` match nothing."""
        closed = set()
        for index, done in states:
            closed.add((index, done))
            pattern = self._patterns[index]
            while done < len(pattern) and pattern[done] == ANY:
                done += 1
                closed.add((index, done))
        return frozenset(closed)


# ---------------------------------------------------------------- rules and rights


@dataclass(frozen=True, slots=True)
class _Rule:
    """One `[[rule]]`, checked: `who` and `message` with groups expanded, patterns as written."""

    who: frozenset[str]
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    message: tuple[str, ...]
    admin: bool

    def covers(self, identity: str) -> bool:
        return EVERYONE in self.who or identity in self.who


def _rights_of(identity: str, rules: Iterable[_Rule]) -> Rights:
    applying = [rule for rule in rules if rule.covers(identity)]
    return Rights(
        sub=identity,
        subscribe=_expand(identity, (rule.subscribe for rule in applying)),
        publish=_expand(identity, (rule.publish for rule in applying)),
        message=_unique(name for rule in applying for name in rule.message),
        admin=any(rule.admin for rule in applying),
        named=bool(applying),
    )


def _expand(identity: str, pattern_lists: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Patterns with `{sub}` replaced by `identity`, each once."""
    return _unique(p.replace(SUB, identity) for patterns in pattern_lists for p in patterns)


def _segments(patterns: Iterable[str]) -> list[tuple[str, ...]]:
    return [tuple(pattern.split(".")) for pattern in patterns]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    """`items` without repeats, in first-seen order."""
    return tuple(dict.fromkeys(items))


# ---------------------------------------------------------------- parsing


class _Problem(Exception):
    """A semantic error and where to look for its line (the arguments of _locate)."""

    def __init__(
        self, message: str, table: str | None = None, index: int = 0, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.table = table
        self.index = index
        self.key = key


def _in_rule(index: int, key: str, problem: str) -> _Problem:
    return _Problem(f"rule {index + 1}: {key}: {problem}", "rule", index, key)


def _parse_document(document: Mapping[str, object]) -> list[_Rule]:
    for key in document:
        if key not in ("groups", "rule"):
            raise _Problem(f"unknown key {_quote(key)} (expected [groups] and [[rule]])", key=key)
    groups = _parse_groups(document.get("groups", {}))
    rules = document.get("rule", [])
    if not isinstance(rules, list) or not all(isinstance(rule, dict) for rule in rules):
        raise _Problem("rule: must be an array of tables, each written [[rule]]", key="rule")
    return [_parse_rule(index, rule, groups) for index, rule in enumerate(rules)]


def _parse_groups(table: object) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise _Problem("groups: must be a table of NAME = [identities]", key="groups")
    groups = {}
    for name, members in table.items():
        problem = _group_problem(name, members)
        if problem is not None:
            raise _Problem(f"groups: {problem}", "groups", key=name)
        groups[name] = _unique(members)
    return groups


def _group_problem(name: str, members: object) -> str | None:
    if not IDENTITY.fullmatch(name) or name.startswith(GROUP_PREFIX):
        return f"{_quote(name)} is not a group name ({_IDENTITY_RULE}, no leading @)"
    if not _is_strings(members):
        return f"{name}: must be a list of identities"
    for member in members:
        if member.startswith(GROUP_PREFIX):
            return f"{name}: {_quote(member)}: groups do not nest (list identities)"
        if not IDENTITY.fullmatch(member):
            return f"{name}: {_quote(member)} is not an identity ({_IDENTITY_RULE})"
    return None


def _parse_rule(index: int, table: dict[str, object], groups: dict[str, tuple[str, ...]]) -> _Rule:
    for key in table:
        if key not in _RULE_KEYS:
            message = (
                f"rule {index + 1}: unknown key {_quote(key)} (a rule has {', '.join(_RULE_KEYS)})"
            )
            raise _Problem(message, "rule", index, key)
    if "who" not in table:
        raise _in_rule(index, "who", 'missing (a list of "*", NAME or "@GROUP")')
    who = _names(index, "who", table["who"], groups)
    if not table["who"]:
        raise _in_rule(index, "who", 'empty (a list of "*", NAME or "@GROUP")')
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise _in_rule(index, "admin", "must be true or false")
    return _Rule(
        who=frozenset(who),
        subscribe=_patterns(index, "subscribe", table.get("subscribe", [])),
        publish=_patterns(index, "publish", table.get("publish", [])),
        message=_names(index, "message", table.get("message", []), groups),
        admin=admin,
    )


def _names(
    index: int, key: str, value: object, groups: dict[str, tuple[str, ...]]
) -> tuple[str, ...]:
    """`who` or `message` entries: "*" and identities, each `@GROUP` replaced by its members."""
    if not _is_strings(value):
        raise _in_rule(index, key, 'must be a list of "*", NAME or "@GROUP"')
    names: list[str] = []
    for entry in value:
        if entry.startswith(GROUP_PREFIX):
            members = groups.get(entry[len(GROUP_PREFIX) :])
            if members is None:
                raise _in_rule(index, key, f"unknown group {_quote(entry)}")
            names.extend(members)
        elif entry == EVERYONE or IDENTITY.fullmatch(entry):
            names.append(entry)
        else:
            problem = f'{_quote(entry)} is not "*", an identity ({_IDENTITY_RULE}) or "@GROUP"'
            raise _in_rule(index, key, problem)
    return _unique(names)


def _patterns(index: int, key: str, value: object) -> tuple[str, ...]:
    if not _is_strings(value):
        raise _in_rule(index, key, "must be a list of topic patterns")
    for pattern in value:
        problem = _pattern_problem(pattern)
        if problem is not None:
            raise _in_rule(index, key, f"{_quote(pattern)} is not a topic pattern ({problem})")
    return _unique(value)


def _pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a topic pattern ({sub} standing for one identity), or None."""
    if not pattern:
        return "empty"
    if pattern.startswith(TOPIC_PREFIX):
        return f"patterns are written without {TOPIC_PREFIX}"
    segments = pattern.split(".")
    if len(segments) > MAX_SEGMENTS:
        return f"more than {MAX_SEGMENTS} segments"
    for segment in segments:
        if not segment:
            return "empty segment"
        if segment not in (ONE, ANY) and not _SEGMENT.fullmatch(segment.replace(SUB, _PLACEHOLDER)):
            return (
                f"segment {_quote(segment)} may only contain A-Z a-z 0-9 _ - and {SUB},"
                f" or be exactly {ONE} or {ANY}"
            )
    return None


def _is_strings(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _quote(value: str) -> str:
    return repr(value[:_QUOTED_CHARS]) + ("..." if len(value) > _QUOTED_CHARS else "")


# ---------------------------------------------------------------- error lines

_DECODE_AT = re.compile(
    r"(?P<problem>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)"
)
# A table header alone on its line: `[groups]`, `[[rule]]` (a comment may follow).
_HEADER = re.compile(r"\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?")


def _one_line(source: str, line: int | None, problem: str) -> str:
    return f"{source}:{line}: {problem}" if line is not None else f"{source}: {problem}"


def _decode_error(source: str, text: str, message: str) -> str:
    """tomllib's "Problem (at line N, column M)" as "SOURCE:N: problem (column M)"."""
    found = _DECODE_AT.fullmatch(message)
    if found is None:
        return f"{source}: {message}"
    problem = found["problem"][:1].lower() + found["problem"][1:]
    if found["line"] is None:
        last_line = text.count("\n") + 1
        return f"{source}:{last_line}: {problem} (at the end of the file)"
    return f"{source}:{found['line']}: {problem} (column {found['column']})"


@dataclass(frozen=True, slots=True)
class _Section:
    """The lines of one table: its name (None at the top of the file) and header line."""

    name: str | None
    line: int | None
    body: list[tuple[int, str]]


def _sections(text: str) -> list[_Section]:
    sections = [_Section(None, None, [])]
    for number, line in enumerate(text.split("\n"), start=1):  # TOML's own line breaks
        header = _HEADER.fullmatch(line.rstrip())
        if header is None:
            sections[-1].body.append((number, line))
        else:
            name = re.sub(r"[\s\"']", "", header[1])  # `[ "rule" ]` is `[rule]`
            sections.append(_Section(name, number, []))
    return sections


def _locate(text: str, table: str | None, index: int, key: str | None) -> int | None:
    """The line where `key` is set in the `index`-th `[table]` or `[[table]]` (None: the top
    of the file, where a key may also be a table of its own), else the table's header line."""
    sections = _sections(text)
    matching = [section for section in sections if section.name == table]
    if index >= len(matching):  # an inline table, perhaps: look for the key that holds it
        return None if table is None else _locate(text, None, 0, table)
    section = matching[index]
    if key is not None:
        quoted = re.escape(key)
        setting = re.compile(rf"\s*(?:{quoted}|\"{quoted}\"|'{quoted}')\s*[=.]")
        for number, line in section.body:
            if setting.match(line):
                return number
        if table is None:
            return next((s.line for s in sections if (s.name or "").split(".")[0] == key), None)
    return section.line
