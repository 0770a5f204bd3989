"""Presence as plain values (PROTOCOL.md §11): counts per identity, snapshots, join/leave events.

Watchers push into a recording outbox; every push is parsed back with the server's own STOMP
parser, so these tests see exactly the MESSAGE frames a client would.
"""

from __future__ import annotations

import json
import logging

import pytest

from chat.protocol.topics import PRESENCE_PREFIX
from chat.server.broker import Subscription
from chat.server.presence import Presence
from tests.test_server_policy import RecordingOutbox

ROOM = "dev.backend"


def watcher(presence: Presence, sub_id: str = "p0", room: str = ROOM) -> RecordingOutbox:
    outbox = RecordingOutbox()
    presence.watch(room, Subscription(outbox, sub_id))
    return outbox


def events(outbox: RecordingOutbox) -> list[tuple[str | None, object]]:
    """Each pushed MESSAGE as (presence kind, decoded JSON body)."""
    return [(frame.get("presence"), json.loads(frame.body)) for frame in outbox.frames()]


def joined(*names: str) -> Presence:
    presence = Presence()
    for name in names:
        presence.join(ROOM, name)
    return presence


def test_prefix_is_the_presence_destination() -> None:
    assert PRESENCE_PREFIX == "/presence/"


def test_the_snapshot_comes_first_then_one_message_per_change() -> None:
    presence = joined("bob", "alice")
    outbox = watcher(presence)
    presence.join(ROOM, "carol")
    presence.leave(ROOM, "alice")
    assert events(outbox) == [
        ("snapshot", {"room": ROOM, "members": ["alice", "bob"]}),
        ("join", {"room": ROOM, "who": "carol"}),
        ("leave", {"room": ROOM, "who": "alice"}),
    ]


def test_each_push_is_exactly_one_websocket_frame_holding_one_message() -> None:
    presence = joined("alice")
    outbox = watcher(presence)
    presence.join(ROOM, "bob")
    assert len(outbox.pushed) == 2
    for data in outbox.pushed:
        single = RecordingOutbox()
        single.push(data)
        assert [frame.command for frame in single.frames()] == ["MESSAGE"]


def test_headers_are_exactly_those_of_the_protocol_and_no_history_ones() -> None:
    presence = joined("alice")
    outbox = watcher(presence, "sub-7")
    presence.join(ROOM, "bob")
    snapshot, join = outbox.frames()
    for frame, kind in ((snapshot, "snapshot"), (join, "join")):
        assert frame.command == "MESSAGE"
        assert frame.headers == (
            ("subscription", "sub-7"),
            ("destination", "/presence/dev.backend"),
            ("message-id", frame.get("message-id")),
            ("content-type", "application/json"),
            ("content-length", str(len(frame.body))),
            ("presence", kind),
        )
    assert snapshot.get("message-id") != join.get("message-id")


def test_bodies_are_compact_json_byte_for_byte() -> None:
    presence = joined("bob", "alice")
    outbox = watcher(presence)
    presence.join(ROOM, "carol")
    presence.leave(ROOM, "bob")
    assert [frame.body for frame in outbox.frames()] == [
        b'{"room":"dev.backend","members":["alice","bob"]}',
        b'{"room":"dev.backend","who":"carol"}',
        b'{"room":"dev.backend","who":"bob"}',
    ]


def test_an_empty_room_has_an_empty_snapshot() -> None:
    outbox = watcher(Presence())
    assert [frame.body for frame in outbox.frames()] == [b'{"room":"dev.backend","members":[]}']


def test_identities_with_dots_at_signs_and_dashes_appear_verbatim() -> None:
    names = ["alice.smith@example.org", "bob-2", "ops.team-lead"]
    presence = joined(*names)
    outbox = watcher(presence)
    presence.join(ROOM, "carol@x-y.z")
    assert presence.members(ROOM) == sorted([*names, "carol@x-y.z"])
    snapshot, join = outbox.frames()
    assert snapshot.body == (
        b'{"room":"dev.backend","members":["alice.smith@example.org","bob-2","ops.team-lead"]}'
    )
    assert join.body == b'{"room":"dev.backend","who":"carol@x-y.z"}'


def test_three_subscriptions_of_one_identity_are_one_member_until_the_last_ends() -> None:
    presence = Presence()
    outbox = watcher(presence)
    for _ in range(3):
        presence.join(ROOM, "alice")
    assert presence.members(ROOM) == ["alice"]
    presence.leave(ROOM, "alice")
    presence.leave(ROOM, "alice")
    assert presence.members(ROOM) == ["alice"]
    assert events(outbox) == [
        ("snapshot", {"room": ROOM, "members": []}),
        ("join", {"room": ROOM, "who": "alice"}),
    ]
    presence.leave(ROOM, "alice")
    assert presence.members(ROOM) == []
    assert events(outbox)[2:] == [("leave", {"room": ROOM, "who": "alice"})]


def test_members_are_sorted_and_per_room() -> None:
    presence = Presence()
    for room, name in [(ROOM, "carol"), (ROOM, "alice"), ("lobby", "bob"), (ROOM, "bob")]:
        presence.join(room, name)
    assert presence.members(ROOM) == ["alice", "bob", "carol"]
    assert presence.members("lobby") == ["bob"]
    assert presence.members("elsewhere") == []


def test_watchers_of_one_room_see_nothing_of_another() -> None:
    presence = Presence()
    lobby = watcher(presence, room="lobby")
    presence.join(ROOM, "alice")
    presence.leave(ROOM, "alice")
    assert [kind for kind, _ in events(lobby)] == ["snapshot"]


def test_every_watcher_gets_its_own_subscription_header() -> None:
    presence = Presence()
    outboxes = {sub_id: watcher(presence, sub_id) for sub_id in ("a", "b", "c")}
    presence.join(ROOM, "alice")
    for sub_id, outbox in outboxes.items():
        frames = outbox.frames()
        assert [frame.get("subscription") for frame in frames] == [sub_id, sub_id]
        assert frames[1].get("presence") == "join"
    message_ids = {outbox.frames()[1].get("message-id") for outbox in outboxes.values()}
    assert len(message_ids) == 1  # one change, one message, however many watchers


def test_watchers_with_the_same_subscription_id_share_one_frame() -> None:
    presence = Presence()
    first, second = watcher(presence, "0"), watcher(presence, "0")
    presence.join(ROOM, "alice")
    assert first.pushed[1] is second.pushed[1]


def test_one_connection_may_watch_with_two_subscriptions() -> None:
    presence = Presence()
    outbox = RecordingOutbox()
    presence.watch(ROOM, Subscription(outbox, "x"))
    presence.watch(ROOM, Subscription(outbox, "y"))
    presence.join(ROOM, "alice")
    frames = outbox.frames()
    assert [(f.get("subscription"), f.get("presence")) for f in frames] == [
        ("x", "snapshot"),
        ("y", "snapshot"),
        ("x", "join"),
        ("y", "join"),
    ]


def test_unwatch_stops_the_events_of_that_watcher_only() -> None:
    presence = Presence()
    leaving, staying = RecordingOutbox(), RecordingOutbox()
    subscription = Subscription(leaving, "s")
    presence.watch(ROOM, subscription)
    presence.watch(ROOM, Subscription(staying, "s"))
    presence.unwatch(ROOM, subscription)
    presence.join(ROOM, "alice")
    assert [kind for kind, _ in events(leaving)] == ["snapshot"]
    assert [kind for kind, _ in events(staying)] == ["snapshot", "join"]


def test_unwatch_of_an_unknown_watcher_is_harmless() -> None:
    presence = Presence()
    presence.unwatch(ROOM, Subscription(RecordingOutbox(), "s"))
    outbox = watcher(presence)
    presence.unwatch(ROOM, Subscription(RecordingOutbox(), "s"))
    presence.join(ROOM, "alice")
    assert [kind for kind, _ in events(outbox)] == ["snapshot", "join"]


def test_message_ids_are_unique_across_changes_watchers_and_instances() -> None:
    seen: list[str | None] = []
    for _ in range(2):
        presence = Presence()
        outbox = watcher(presence)
        presence.join(ROOM, "alice")
        presence.leave(ROOM, "alice")
        seen.extend(frame.get("message-id") for frame in outbox.frames())
    assert len(set(seen)) == len(seen) == 6
    assert all(message_id and message_id.startswith("p-") for message_id in seen)


def test_rooms_without_members_or_watchers_leave_no_state() -> None:
    presence = Presence()
    subscription = Subscription(RecordingOutbox(), "s")
    presence.watch(ROOM, subscription)
    presence.join(ROOM, "alice")
    presence.join(ROOM, "alice")
    presence.join("lobby", "bob")
    presence.leave(ROOM, "alice")
    presence.leave(ROOM, "alice")
    presence.leave("lobby", "bob")
    assert presence._members == {}
    assert presence._watchers == {ROOM: {subscription: None}}
    presence.unwatch(ROOM, subscription)
    assert presence._watchers == {}


def test_a_member_of_one_room_keeps_its_other_rooms() -> None:
    presence = joined("alice")
    presence.join("lobby", "alice")
    presence.join(ROOM, "bob")
    presence.leave(ROOM, "alice")
    assert presence._members == {ROOM: {"bob": 1}, "lobby": {"alice": 1}}


@pytest.mark.parametrize(
    ("room", "identity"),
    [("nowhere", "alice"), (ROOM, "mallory"), (ROOM, "alice")],
    ids=["unknown room", "unknown identity", "one leave too many"],
)
def test_a_leave_without_a_join_changes_nothing_and_is_logged(
    room: str, identity: str, caplog: pytest.LogCaptureFixture
) -> None:
    presence = joined("alice")
    presence.leave(ROOM, "alice")  # alice's one subscription has ended: she is gone
    presence.join(ROOM, "bob")
    outbox = watcher(presence)
    with caplog.at_level(logging.WARNING, logger="chat.server"):
        presence.leave(room, identity)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert identity in caplog.records[0].getMessage()
    assert presence.members(ROOM) == ["bob"]
    assert presence._members == {ROOM: {"bob": 1}}  # no zero or negative count left behind
    assert [kind for kind, _ in events(outbox)] == ["snapshot"]
    presence.join(room, identity)  # the count starts again from zero, not below it
    assert identity in presence.members(room)
    presence.leave(room, identity)
    assert identity not in presence.members(room)
