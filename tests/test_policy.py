"""The authorization policy (PROTOCOL.md §9): rule forms, `{sub}`, containment checked against
brute-force enumeration, publish matching, and the one-line error of every kind of bad file."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.protocol.policy import DEFAULT_POLICY, Policy, PolicyError, Rights, contains
from chat.protocol.topics import MAX_SEGMENTS
from tests.test_topics import reference_match

SPEC_EXAMPLE = """\
[groups]
ops = ["alice", "carol"]

[[rule]]
who = ["*"]                            # "*" every identity, "NAME", or "@GROUP"
subscribe = ["lobby", "team.{sub}.#"]  # topic patterns under /topic/; {sub} is the identity
publish = ["lobby"]
message = ["*"]                        # whom these identities may send direct messages (§10)

[[rule]]
who = ["@ops"]
subscribe = ["#"]
publish = ["ops.#", "lobby"]
admin = true                           # may use the admin routes (§12)
"""

NAMED = """\
[groups]
ops = ["alice", "carol"]
devs = ["bob", "carol", "a.b"]

[[rule]]
who = ["@ops"]
subscribe = ["ops.#", "u-{sub}"]
publish = ["ops.#"]
message = ["@devs", "erin"]
admin = true

[[rule]]
who = ["dave", "@devs"]
subscribe = ["dev.*", "team.{sub}.#", "ops.#"]
message = ["erin", "@ops"]

[[rule]]
who = ["frank"]
admin = false
"""


def split(name: str) -> tuple[str, ...]:
    return tuple(name.split("."))


# ---------------------------------------------------------------- rights


@pytest.mark.parametrize(
    ("identity", "subscribe", "publish", "message", "admin"),
    [
        ("alice", ["ops.#", "u-alice"], ["ops.#"], ["bob", "carol", "a.b", "erin"], True),
        (  # in a group and in both rules: the union, each pattern once, in rule order
            "carol",
            ["ops.#", "u-carol", "dev.*", "team.carol.#"],
            ["ops.#"],
            ["bob", "carol", "a.b", "erin", "alice"],
            True,
        ),
        ("dave", ["dev.*", "team.dave.#", "ops.#"], [], ["erin", "alice", "carol"], False),
        ("a.b", ["dev.*", "team.a.b.#", "ops.#"], [], ["erin", "alice", "carol"], False),
        ("frank", [], [], [], False),  # a key a rule leaves out grants nothing
        ("zed", [], [], [], False),  # no rule names zed
    ],
)
def test_rights_are_the_union_of_the_rules_that_cover_the_identity(
    identity: str, subscribe: list[str], publish: list[str], message: list[str], admin: bool
) -> None:
    rights = Policy.parse(NAMED, "acl.toml").rights(identity)
    assert rights.as_json() == {
        "sub": identity,
        "subscribe": subscribe,
        "publish": publish,
        "message": message,
        "admin": admin,
    }
    assert rights.named is (identity != "zed")


def test_the_example_of_the_spec() -> None:
    policy = Policy.parse(SPEC_EXAMPLE, "acl.toml")
    bob, alice = policy.rights("bob"), policy.rights("alice")
    assert bob == Rights("bob", ("lobby", "team.bob.#"), ("lobby",), ("*",), False, True)
    assert alice.subscribe == ("lobby", "team.alice.#", "#")
    assert alice.publish == ("lobby", "ops.#")
    assert alice.admin
    assert not bob.may_subscribe(split("ops.x")) and alice.may_subscribe(split("ops.x"))
    assert not bob.may_publish(split("ops.x")) and alice.may_publish(split("ops.x"))
    assert bob.may_message("anyone") and alice.may_message("anyone")


@pytest.mark.parametrize("text", ["", "# nothing here\n", "[groups]\nops = []\n", "rule = []\n"])
def test_a_policy_without_rules_grants_nothing(text: str) -> None:
    rights = Policy.parse(text, "acl.toml").rights("alice")
    assert rights == Rights("alice", (), (), (), False, False)
    assert not rights.may_subscribe(split("a"))
    assert not rights.may_publish(split("a"))
    assert not rights.may_message("alice")


@pytest.mark.parametrize(
    ("message", "allowed", "refused"),
    [
        (["*"], ["alice", "bob", "x@y"], []),
        (["bob"], ["bob"], ["alice", "bobby"]),
        (["@ops", "dave"], ["alice", "carol", "dave"], ["bob"]),
        ([], [], ["alice", "bob"]),
    ],
)
def test_message_forms(message: list[str], allowed: list[str], refused: list[str]) -> None:
    entries = ", ".join(f'"{entry}"' for entry in message)
    text = f'[groups]\nops = ["alice", "carol"]\n[[rule]]\nwho = ["*"]\nmessage = [{entries}]\n'
    rights = Policy.parse(text, "acl.toml").rights("zed")
    assert [name for name in allowed + refused if rights.may_message(name)] == allowed


def test_admin_is_true_when_any_applying_rule_says_so() -> None:
    text = (
        '[[rule]]\nwho = ["*"]\nadmin = false\n'
        '[[rule]]\nwho = ["root"]\nadmin = true\n'
        '[[rule]]\nwho = ["root"]\n'
    )
    policy = Policy.parse(text, "acl.toml")
    assert policy.rights("root").as_json()["admin"] is True
    assert policy.rights("user").as_json()["admin"] is False


def test_sub_is_replaced_by_the_identity_and_split_on_its_dots() -> None:
    text = '[[rule]]\nwho = ["*"]\nsubscribe = ["team.{sub}.#", "u-{sub}"]\npublish = ["{sub}"]\n'
    policy = Policy.parse(text, "acl.toml")
    dotted = policy.rights("a.b")
    assert dotted.subscribe == ("team.a.b.#", "u-a.b")
    assert dotted.may_subscribe(split("team.a.b.x")) and dotted.may_subscribe(split("u-a.b"))
    assert not dotted.may_subscribe(split("team.a")) and not dotted.may_subscribe(split("u-a"))
    assert dotted.may_publish(split("a.b")) and not dotted.may_publish(split("a"))
    mailer = policy.rights("x@y")  # no topic has an @: grants nothing there, and no error
    assert mailer.subscribe == ("team.x@y.#", "u-x@y")
    assert not mailer.may_subscribe(split("team.*.#")) and not mailer.may_subscribe(split("u-x"))


@pytest.mark.parametrize(
    ("pattern", "allowed"),
    [
        ("team.alice", True),
        ("team.alice.x.y", True),
        ("team.alice.*", True),
        ("team.alice.#", True),
        ("team.*", False),
        ("team.#", False),
        ("team.bob.x", False),
        ("*.alice", False),
        ("#", False),
        ("lobby", True),
        ("lobby.x", False),
    ],
)
def test_subscriptions_under_team_sub(pattern: str, allowed: bool) -> None:
    text = '[[rule]]\nwho = ["*"]\nsubscribe = ["lobby", "team.{sub}.#"]\n'
    rights = Policy.parse(text, "acl.toml").rights("alice")
    assert rights.may_subscribe(split(pattern)) is allowed


def test_rights_are_cached_and_only_for_identities() -> None:
    policy = Policy.parse('[[rule]]\nwho = ["*"]\nsubscribe = ["u.{sub}"]\n', "acl.toml")
    assert policy.rights("alice") is policy.rights("alice")
    for bad in ["", "*", "#", "a b", "x" * 65]:  # `u.*` or `u.#` would reach everyone's room
        assert policy.rights(bad) == Rights(bad, (), (), (), False, False)


def test_default_policy_grants_everything() -> None:
    rights = Policy.parse(DEFAULT_POLICY, "acl.toml").rights("anyone")
    assert rights.as_json() == {
        "sub": "anyone",
        "subscribe": ["#"],
        "publish": ["#"],
        "message": ["*"],
        "admin": False,
    }
    assert rights.named
    assert rights.may_subscribe(("#",)) and rights.may_subscribe(split("a.*.b.#"))
    assert rights.may_publish(split("a.b.c")) and rights.may_message("bob")


def test_default_policy_example_parses_once_uncommented() -> None:
    lines = DEFAULT_POLICY.splitlines()
    start = lines.index("# [groups]")
    example = [line.removeprefix("# ").removeprefix("#") for line in lines[start:]]
    policy = Policy.parse("\n".join(example), "acl.toml")
    assert policy.rights("alice").admin and not policy.rights("bob").admin
    assert policy.rights("carol").may_publish(split("ops.x"))


# ---------------------------------------------------------------- containment


@pytest.mark.parametrize(
    ("grants", "pattern", "expected"),
    [
        (["dev.#"], "dev.*", True),
        (["dev.#"], "dev", True),
        (["dev.#"], "dev.a.#", True),
        (["dev.#"], "#", False),
        (["dev.#"], "*.x", False),
        (["dev.*"], "dev.#", False),
        (["#"], "#", True),
        (["#"], "a.*.#.b", True),
        (["*.#"], "#", True),  # topics have at least one segment
        (["#.*"], "#", True),
        (["*.#"], "#.*", True),  # equal languages
        (["#.*"], "*.#", True),
        (["a.*"], "a.#", False),  # `a` and `a.b.c`
        (["#.x"], "*.x", True),
        (["*.x"], "#.x", False),
        (["#.a.#"], "*.a", True),
        (["#.a.#"], "a", True),
        (["#.a.#"], "*.b", False),
        (["a.#", "b.#"], "a.x", True),  # the union counts
        (["a.#", "b.#"], "*.x", False),
        (["a", "a.*", "a.*.*.#"], "a.#", True),
        (["a", "a.*.*.#"], "a.#", False),  # `a.x`
        (["a.b", "a.*.c"], "a.*", False),
        (["a.*", "*.b"], "*.*", False),
        (["a.*", "*.*"], "*.*", True),
        (["*", "*.*"], "*.#", False),
        (["lobby"], "lobby", True),
        (["lobby"], "lobby2", False),
        ([], "a", False),
        ([], "#", False),
    ],
)
def test_contains(grants: list[str], pattern: str, expected: bool) -> None:
    assert contains([split(grant) for grant in grants], split(pattern)) is expected


def test_no_topic_is_longer_than_max_segments() -> None:
    lengths = [("*",) * length for length in range(1, MAX_SEGMENTS + 1)]
    assert contains(lengths, ("#",))
    assert not contains(lengths[:-1], ("#",))


def test_containment_stays_small_for_patterns_that_determinize_badly() -> None:
    stars = ("*",) * 29
    assert contains([("#",)], ("#", "a", *stars))
    assert contains([("#", "a", *stars), ("#", "b")], ("#", "a", *stars))
    assert not contains([("#", "a", *stars), ("#", "b", *stars)], ("#", "*", *stars))


TOPICS = [t for n in range(1, 6) for t in itertools.product("abc", repeat=n)]
SMALL_PATTERNS = st.lists(st.sampled_from("ab*#"), min_size=1, max_size=4).map(tuple)


@settings(max_examples=400, deadline=None)
@given(grants=st.lists(SMALL_PATTERNS, max_size=4), pattern=SMALL_PATTERNS)
def test_contains_agrees_with_enumerating_topics(
    grants: list[tuple[str, ...]], pattern: tuple[str, ...]
) -> None:
    expected = all(
        any(reference_match(grant, topic) for grant in grants)
        for topic in TOPICS
        if reference_match(pattern, topic)
    )
    assert contains(grants, pattern) is expected


@pytest.mark.parametrize(
    ("publish", "topic", "expected"),
    [
        (["lobby"], "lobby", True),
        (["lobby"], "lobby.x", False),
        (["ops.#"], "ops", True),
        (["ops.#"], "ops.a.b", True),
        (["ops.#"], "opsx", False),
        (["*.news"], "sport.news", True),
        (["*.news"], "news", False),
        (["a.#.z"], "a.z", True),
        (["a.#.z"], "a.b.c.z", True),
        (["a.#.z"], "a.b.c", False),
        (["x", "y.*"], "y.1", True),
        ([], "lobby", False),
    ],
)
def test_may_publish(publish: list[str], topic: str, expected: bool) -> None:
    rights = Rights("alice", (), tuple(publish), (), False, True)
    assert rights.may_publish(split(topic)) is expected


# ---------------------------------------------------------------- bad files

RULE = '[[rule]]\nwho = ["*"]\n'


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '[groups]\nops = ["alice"]\n\n[[rule]]\nwho = ["*"]\n\n'
            '[[rule]]\nwho = ["@ops"]\nsubscribe = ["lobby",\n  "dev..x"]\n',
            "acl.toml:9: rule 2: subscribe: 'dev..x' is not a topic pattern (empty segment)",
        ),
        (
            "[[rule]]\nwho = \n",
            "acl.toml:2: invalid value (column 7)",
        ),
        ("who = [", "acl.toml:1: invalid value (at the end of the file)"),
        ("x = 1\n", "acl.toml:1: unknown key 'x' (expected [groups] and [[rule]])"),
        (
            RULE + "[other]\na = 1\n",
            "acl.toml:3: unknown key 'other' (expected [groups] and [[rule]])",
        ),
        (
            "[rule]\nwho = ['*']\n",
            "acl.toml:1: rule: must be an array of tables, each written [[rule]]",
        ),
        ("rule = [1]\n", "acl.toml:1: rule: must be an array of tables, each written [[rule]]"),
        ("groups = 1\n", "acl.toml:1: groups: must be a table of NAME = [identities]"),
        (
            '[groups]\nops = ["alice"]\ndevs = "bob"\n',
            "acl.toml:3: groups: devs: must be a list of identities",
        ),
        (
            '[groups]\nops = ["alice", "b*b"]\n',
            "acl.toml:2: groups: ops: 'b*b' is not an identity"
            " (1-64 characters of A-Z a-z 0-9 _ . @ -)",
        ),
        (
            '[groups]\nops = ["alice"]\nall = ["@ops"]\n',
            "acl.toml:3: groups: all: '@ops': groups do not nest (list identities)",
        ),
        (
            '[groups]\n"o p" = []\n',
            "acl.toml:2: groups: 'o p' is not a group name"
            " (1-64 characters of A-Z a-z 0-9 _ . @ -, no leading @)",
        ),
        (
            RULE + RULE + "subscibe = ['#']\n",
            "acl.toml:5: rule 2: unknown key 'subscibe'"
            " (a rule has who, subscribe, publish, message, admin)",
        ),
        (
            RULE + "[[rule]]\nadmin = true\n",
            'acl.toml:3: rule 2: who: missing (a list of "*", NAME or "@GROUP")',
        ),
        (
            "[[rule]]\nwho = []\n",
            'acl.toml:2: rule 1: who: empty (a list of "*", NAME or "@GROUP")',
        ),
        (
            '[[rule]]\nwho = "*"\n',
            'acl.toml:2: rule 1: who: must be a list of "*", NAME or "@GROUP"',
        ),
        ('[[rule]]\nwho = ["@nobody"]\n', "acl.toml:2: rule 1: who: unknown group '@nobody'"),
        (
            '[[rule]]\nwho = ["a b"]\n',
            "acl.toml:2: rule 1: who: 'a b' is not \"*\", an identity"
            ' (1-64 characters of A-Z a-z 0-9 _ . @ -) or "@GROUP"',
        ),
        (
            RULE + 'message = ["{sub}"]\n',
            "acl.toml:3: rule 1: message: '{sub}' is not \"*\", an identity"
            ' (1-64 characters of A-Z a-z 0-9 _ . @ -) or "@GROUP"',
        ),
        (RULE + "admin = 1\n", "acl.toml:3: rule 1: admin: must be true or false"),
        (
            RULE + "publish = 'lobby'\n",
            "acl.toml:3: rule 1: publish: must be a list of topic patterns",
        ),
        (
            RULE + "publish = ['']\n",
            "acl.toml:3: rule 1: publish: '' is not a topic pattern (empty)",
        ),
        (
            RULE + "publish = ['/topic/lobby']\n",
            "acl.toml:3: rule 1: publish: '/topic/lobby' is not a topic pattern"
            " (patterns are written without /topic/)",
        ),
        (
            RULE + "subscribe = ['a.b!c']\n",
            "acl.toml:3: rule 1: subscribe: 'a.b!c' is not a topic pattern"
            " (segment 'b!c' may only contain A-Z a-z 0-9 _ - and {sub}, or be exactly * or #)",
        ),
        (
            RULE + "subscribe = ['a.#{sub}']\n",
            "acl.toml:3: rule 1: subscribe: 'a.#{sub}' is not a topic pattern"
            " (segment '#{sub}' may only contain A-Z a-z 0-9 _ - and {sub}, or be exactly * or #)",
        ),
        (
            RULE + f"subscribe = ['{'.'.join(['a'] * 33)}']\n",
            f"acl.toml:3: rule 1: subscribe: '{'a.' * 30}'... is not a topic pattern"
            " (more than 32 segments)",
        ),
        (  # a table inside a rule: the rule's header
            RULE + RULE + "[rule.extra]\na = 1\n",
            "acl.toml:3: rule 2: unknown key 'extra'"
            " (a rule has who, subscribe, publish, message, admin)",
        ),
        (
            RULE + "[other.x]\na = 1\n",
            "acl.toml:3: unknown key 'other' (expected [groups] and [[rule]])",
        ),
        (  # an inline array of tables: the line of the key that holds it
            'rule = [{who = ["*"], admin = "yes"}]\n',
            "acl.toml:1: rule 1: admin: must be true or false",
        ),
    ],
)
def test_bad_files_are_one_line_errors(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.parse(text, "acl.toml")
    assert str(caught.value) == error


def test_values_in_errors_stay_on_one_line() -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.parse('[[rule]]\nwho = ["a\\nb"]\n', "acl.toml")
    assert str(caught.value).startswith("acl.toml:2: rule 1: who: 'a\\nb' is not")
    assert "\n" not in str(caught.value)


def test_deeply_nested_values_are_an_error_not_a_crash() -> None:
    with pytest.raises(PolicyError, match=r"^acl\.toml: values nested too deeply$"):
        Policy.parse("who = " + "[" * 5000, "acl.toml")


def test_load_reads_utf8_files(tmp_path: Path) -> None:
    path = tmp_path / "acl.toml"
    path.write_bytes(b"\xef\xbb\xbf" + DEFAULT_POLICY.encode())  # a byte-order mark is fine
    assert Policy.load(path).rights("bob").may_subscribe(("#",))


def test_load_names_the_file_it_cannot_use(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(PolicyError) as caught:
        Policy.load(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"
    with pytest.raises(PolicyError) as caught:
        Policy.load(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read: Is a directory"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[[rule]]\nwho = ["*"]\n# caf\xe9\n')
    with pytest.raises(PolicyError) as caught:
        Policy.load(latin1)
    assert str(caught.value) == f"{latin1}:3: not UTF-8 text"
    bad = tmp_path / "bad.toml"
    bad.write_text(RULE + "admin = 1\n", encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        Policy.load(bad)
    assert str(caught.value) == f"{bad}:3: rule 1: admin: must be true or false"
