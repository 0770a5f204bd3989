"""Rooms with permissions as plain values (PROTOCOL.md §9-§11): the session's checks against a
policy, direct messages, presence and a live policy change, no network.

The wire-level side (the policy file, its reload, GET /auth/me, ERROR + 1008) is
tests/test_server_acl.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat.protocol import events
from chat.protocol.errors import CloseCode, InvalidDestination
from chat.protocol.policy import Policy
from chat.protocol.stomp import Frame
from chat.protocol.tokens import TokenAuthority
from chat.server.session import StompSession
from tests.test_server_policy import (
    RecordingOutbox,
    Room,
    frame,
    refused,
    send,
    subscribe,
)

POLICY = """\
[groups]
ops = ["carol"]

[[rule]]
who = ["alice", "bob"]
subscribe = ["lobby", "dev.#", "team.{sub}.#"]
publish = ["lobby", "dev.#"]
message = ["*"]

[[rule]]
who = ["@ops"]
subscribe = ["#"]
publish = ["ops.#"]
admin = true

[[rule]]
who = ["mallory"]
message = ["@ops"]
"""


@pytest.fixture
def room(authority: TokenAuthority) -> Room:
    return Room(authority, policy=POLICY)


def bodies(outbox: RecordingOutbox) -> list[bytes]:
    return [f.body for f in outbox.frames()]


def acted_in_order(session: StompSession, event: events.Subscribe, receipt: bytes) -> None:
    """Handle `event` as the connection does: its RECEIPT, then what follows it."""
    acted = session.handle(event)
    session.receipt(receipt, acted.durable_seq)
    if acted.then is not None:
        session.then(acted.then)


# ---------------------------------------------------------------- subscribe: containment


@pytest.mark.parametrize(
    "destination",
    [
        "/topic/lobby",
        "/topic/dev",  # dev.# grants dev itself
        "/topic/dev.backend",
        "/topic/dev.*",  # inside dev.#
        "/topic/dev.#",
        "/topic/dev.*.logs",
        "/topic/team.alice",
        "/topic/team.alice.x.y",
        "/topic/team.alice.*",
        "/topic/team.alice.#",
        "/user/alice",
        "/presence/lobby",
        "/presence/dev.backend",
    ],
)
def test_a_subscription_inside_a_grant_is_allowed(room: Room, destination: str) -> None:
    session, _ = room.session("alice")
    session.handle(subscribe(destination, "1"))


@pytest.mark.parametrize(
    "destination",
    [
        "/topic/#",  # only inside #
        "/topic/*",
        "/topic/lobby.x",  # lobby grants lobby alone
        "/topic/devops",
        "/topic/team.*",  # would reach team.bob
        "/topic/team.bob",
        "/topic/team.bob.x",
        "/topic/*.backend",
        "/user/bob",  # an inbox is its owner's alone
        "/presence/ops",
        "/presence/team.bob",
    ],
)
def test_a_subscription_outside_every_grant_is_forbidden(room: Room, destination: str) -> None:
    session, _ = room.session("alice")
    error = refused(lambda: session.handle(subscribe(destination, "1")), "forbidden")
    assert error.close_code == CloseCode.POLICY
    assert destination in error.detail
    assert len(room.broker) == 0


@pytest.mark.parametrize("destination", ["/topic/#", "/topic/ops.x", "/presence/anything"])
def test_a_group_granted_everything_reads_everything(room: Room, destination: str) -> None:
    session, _ = room.session("carol")
    session.handle(subscribe(destination, "1"))


def test_an_identity_no_rule_grants_reads_nothing(room: Room) -> None:
    session, _ = room.session("nobody")
    refused(lambda: session.handle(subscribe("/topic/lobby", "1")), "forbidden")
    session.handle(subscribe("/user/nobody", "2"))  # its own inbox is always its own


@pytest.mark.parametrize("history", [{"last": "5"}, {"since-offset": "0", "epoch": "e"}])
def test_replays_are_checked_like_subscriptions(room: Room, history: dict[str, str]) -> None:
    carol, _ = room.session("carol")
    carol.handle(send("/topic/ops.x", b"secret"))
    alice, outbox = room.session("alice")
    refused(lambda: alice.handle(subscribe("/topic/ops.x", "1", **history)), "forbidden")
    assert outbox.pushed == []


# ---------------------------------------------------------------- publish


@pytest.mark.parametrize(
    ("sender", "destination", "allowed"),
    [
        ("alice", "/topic/lobby", True),
        ("alice", "/topic/dev", True),
        ("alice", "/topic/dev.x.y", True),
        ("alice", "/topic/team.alice", False),  # subscribe is not publish
        ("alice", "/topic/ops.x", False),
        ("carol", "/topic/ops.x", True),
        ("carol", "/topic/lobby", False),
        ("mallory", "/topic/lobby", False),
    ],
)
def test_send_needs_a_publish_pattern(
    room: Room, sender: str, destination: str, allowed: bool
) -> None:
    session, _ = room.session(sender)
    if allowed:
        assert session.handle(send(destination)).durable_seq > 0
    else:
        error = refused(lambda: session.handle(send(destination)), "forbidden")
        assert destination in error.detail


def test_presence_is_not_for_sending(room: Room) -> None:
    session, _ = room.session("carol")
    refused(lambda: session.handle(send("/presence/lobby")), "cannot send to presence")


# ---------------------------------------------------------------- direct messages


def test_a_direct_message_reaches_both_inboxes_on_every_device(room: Room) -> None:
    alice_phone, phone = room.session("alice")
    alice_laptop, laptop = room.session("alice")
    bob, bob_box = room.session("bob")
    carol, carol_box = room.session("carol")
    alice_phone.handle(subscribe("/user/alice", "in"))
    alice_laptop.handle(subscribe("/user/alice", "in"))
    bob.handle(subscribe("/user/bob", "in"))
    carol.handle(subscribe("/user/carol", "in"))
    carol.handle(subscribe("/topic/#", "all"))  # reads every topic, never an inbox

    acted = alice_phone.handle(send("/user/bob", b"psst", to="carol", sender="mallory"))

    (to_bob,) = bob_box.frames()
    assert (to_bob.get("destination"), to_bob.get("to"), to_bob.get("sender")) == (
        "/user/bob",
        "bob",
        "alice",
    )
    assert to_bob.body == b"psst" and to_bob.get("offset") == "1"
    for outbox in (phone, laptop):
        (copy,) = outbox.frames()
        assert (copy.get("destination"), copy.get("to"), copy.get("sender")) == (
            "/user/alice",
            "bob",
            "alice",
        )
        assert [h for h in copy.headers if h[0] == "to"] == [("to", "bob")]  # one, the server's
    assert carol_box.frames() == []
    assert acted.durable_seq == room.history.committed_seq  # the RECEIPT covers both copies


def test_a_message_to_yourself_is_stored_once(room: Room) -> None:
    alice, outbox = room.session("alice")
    alice.handle(subscribe("/user/alice", "in"))
    alice.handle(send("/user/alice", b"note"))
    (note,) = outbox.frames()
    assert (note.get("to"), note.get("offset")) == ("alice", "1")


@pytest.mark.parametrize(
    ("sender", "recipient", "allowed"),
    [
        ("alice", "carol", True),  # message = ["*"]
        ("alice", "someone-new", True),
        ("mallory", "carol", True),  # message = ["@ops"]
        ("mallory", "alice", False),
        ("carol", "alice", False),  # a key a rule leaves out grants nothing
    ],
)
def test_a_direct_message_needs_a_message_grant(
    room: Room, sender: str, recipient: str, allowed: bool
) -> None:
    session, _ = room.session(sender)
    if allowed:
        session.handle(send(f"/user/{recipient}"))
    else:
        error = refused(lambda: session.handle(send(f"/user/{recipient}")), "forbidden")
        assert recipient in error.detail


@pytest.mark.parametrize("destination", ["/user/", "/user/*", "/user/a b", "/user/" + "a" * 65])
def test_an_inbox_name_is_an_identity(room: Room, destination: str) -> None:
    session, _ = room.session("alice")
    with pytest.raises(InvalidDestination, match="an inbox is /user/NAME, NAME 1-64 of"):
        session.handle(send(destination))


def test_an_inbox_has_offsets_history_and_resume(room: Room) -> None:
    alice, _ = room.session("alice")
    for n in range(1, 4):
        alice.handle(send("/user/bob", f"m{n}".encode()))
    bob, outbox = room.session("bob")
    acted = bob.handle(subscribe("/user/bob", "last", last="2"))
    assert bodies(outbox) == [b"m2", b"m3"]
    headers = dict(acted.receipt_headers)
    assert headers["offset"] == "3"
    bob.handle(events.Unsubscribe(frame("UNSUBSCRIBE", id="last"), "last"))
    resumed = bob.handle(subscribe("/user/bob", "resume", since_offset="1", epoch=headers["epoch"]))
    assert dict(resumed.receipt_headers)["recovered"] == "true"
    assert bodies(outbox)[2:] == [b"m2", b"m3"]
    alice.handle(send("/user/bob", b"live"))
    assert bodies(outbox)[4:] == [b"live"]


# ---------------------------------------------------------------- presence


def presence(outbox: RecordingOutbox) -> list[tuple[str | None, dict[str, object]]]:
    return [(f.get("presence"), json.loads(f.body)) for f in outbox.frames()]


def test_presence_counts_identities_not_connections(room: Room) -> None:
    carol, watched = room.session("carol")
    acted_in_order(carol, subscribe("/presence/lobby", "p", receipt="r"), b"RECEIPT")
    assert watched.pushed[0] == b"RECEIPT"  # the snapshot follows its RECEIPT
    alice = [room.session("alice")[0] for _ in range(3)]
    for n, session in enumerate(alice):
        session.handle(subscribe("/topic/lobby", str(n)))
    bob, _ = room.session("bob")
    bob.handle(subscribe("/topic/lobby", "b"))
    bob.handle(subscribe("/topic/dev.*", "w"))  # a wildcard is not membership
    alice[0].handle(events.Unsubscribe(frame("UNSUBSCRIBE", id="0"), "0"))
    alice[1].close()
    bob.close()
    alice[2].close()  # her last one
    assert presence(watched) == [
        ("snapshot", {"room": "lobby", "members": []}),
        ("join", {"room": "lobby", "who": "alice"}),
        ("join", {"room": "lobby", "who": "bob"}),
        ("leave", {"room": "lobby", "who": "bob"}),
        ("leave", {"room": "lobby", "who": "alice"}),
    ]
    frame_ = watched.frames()[0]
    assert frame_.get("destination") == "/presence/lobby"
    assert frame_.get("subscription") == "p"


def test_the_snapshot_lists_members_sorted(room: Room) -> None:
    for name in ("bob", "alice"):
        room.session(name)[0].handle(subscribe("/topic/lobby", "1"))
    carol, outbox = room.session("carol")
    acted_in_order(carol, subscribe("/presence/lobby", "p"), b"R")
    assert presence(outbox) == [("snapshot", {"room": "lobby", "members": ["alice", "bob"]})]


def test_a_watch_ended_before_its_receipt_left_watches_nothing(room: Room) -> None:
    carol, outbox = room.session("carol")
    acted = carol.handle(subscribe("/presence/lobby", "p"))
    carol.handle(events.Unsubscribe(frame("UNSUBSCRIBE", id="p"), "p"))
    assert acted.then is not None
    carol.then(acted.then)
    room.session("alice")[0].handle(subscribe("/topic/lobby", "1"))
    assert outbox.pushed == []


@pytest.mark.parametrize("name", ["since-offset", "last"])
def test_presence_has_no_history(room: Room, name: str) -> None:
    carol, _ = room.session("carol")
    f = Frame("SUBSCRIBE", (("destination", "/presence/lobby"), ("id", "1"), (name, "0")))
    event = events.Subscribe(f, "/presence/lobby", "1", "auto")
    refused(lambda: carol.handle(event), f"{name} needs a topic or an inbox")


# ---------------------------------------------------------------- a live policy change


def test_a_policy_change_ends_a_subscription_it_no_longer_allows(room: Room) -> None:
    alice, _ = room.session("alice")
    alice.handle(subscribe("/topic/dev.backend", "1"))
    alice.handle(subscribe("/user/alice", "2"))
    alice.check_authorization()
    room.policy = Policy.parse(POLICY.replace('"dev.#", "team', '"team'), "acl.toml")
    error = refused(alice.check_authorization, "forbidden")
    assert "no longer lets alice subscribe to /topic/dev.backend" in error.detail


def test_a_policy_change_that_still_allows_everything_ends_nothing(room: Room) -> None:
    alice, _ = room.session("alice")
    alice.handle(subscribe("/topic/lobby", "1"))
    alice.handle(subscribe("/presence/dev", "2"))
    room.policy = Policy.parse(POLICY.replace('"lobby", "dev.#"', '"lobby", "dev"'), "acl.toml")
    alice.check_authorization()  # lobby and the watch of dev are still granted
    room.policy = Policy.parse(POLICY.replace('["lobby", "dev.#", ', '["dev.#", '), "acl.toml")
    refused(alice.check_authorization, "forbidden")


# ---------------------------------------------------------------- the README's worked example


def test_the_readme_example_policy_does_what_the_readme_says() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Who may do what", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    policy = Policy.parse(example, "README.md")
    bob, alice, carol = (policy.rights(name) for name in ("bob", "alice", "carol"))
    assert bob.may_subscribe(("team", "bob", "*"))
    assert not bob.may_subscribe(("team", "*"))  # would reach team.alice
    assert not bob.may_subscribe(("#",))
    assert alice.may_subscribe(("#",)) and carol.may_subscribe(("#",))  # only ops
    assert alice.may_publish(("ops", "x")) and not bob.may_publish(("ops", "x"))
    assert bob.may_message("anyone")
    assert (alice.admin, bob.admin, carol.admin) == (False, False, True)
