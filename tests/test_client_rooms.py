"""Rooms with rights, direct messages and presence in the chat, against `FakeLink`.

The chat asks what it may do (GET /auth/me, `FakeLink.policy`) before a SUBSCRIBE or SEND
the server would answer with ERROR and a closed connection; direct messages show as
`[@NAME]`, NAME being the other party; `/presence/ROOM` news keeps `/who` and the
join/leave lines. The console here is `Script`: typed lines in, plain lines out; a few
screens are rendered by pyte (tests/test_terminal.py) where styling matters.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chat.client.display import describe, plain
from chat.client.errors import BadResponse
from chat.client.messages import Message, Presence
from chat.client.resilient import Online, Reconnecting, Refused
from chat.client.rights import Rights
from chat.client.terminal import ChatSession, End, Typed
from chat.protocol.errors import MalformedFrame
from chat.protocol.stomp import Frame
from tests.test_terminal import FakeLink, Terminal, chatting

FAST = 10  # seconds: a safety net only; every wait ends on a line shown


def policy(**grants: Any) -> Rights:
    """What GET /auth/me would answer for alice; nothing granted unless given."""
    base: dict[str, Any] = {"sub": "alice", "subscribe": [], "publish": [], "message": []}
    return Rights.of({**base, "admin": False, **grants})


class Script:
    """A console for tests: lines typed by the test, lines shown kept as plain text."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.prompts: list[str] = []
        self.links: list[Online | Reconnecting] = []
        self._typed_in, self._typed = trio.open_memory_channel[Typed](100)
        self._changed = trio.Event()

    def show(self, line: tuple[tuple[str, str], ...]) -> None:
        self.shown.append(plain(line))
        self._wake()

    def link_changed(self, event: Online | Reconnecting, me: str) -> None:
        self.links.append(event)
        self._wake()

    async def read_line(self, prompt: str) -> Typed:
        self.prompt_changed(prompt)
        return await self._typed.receive()

    def prompt_changed(self, prompt: str) -> None:
        self.prompts.append(prompt)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def type(self, *lines: str) -> None:
        for line in lines:
            self._typed_in.send_nowait(line)

    async def until(self, check: Callable[[list[str]], bool]) -> list[str]:
        with trio.move_on_after(FAST):
            while not check(self.shown):
                await self._changed.wait()
            return self.shown
        raise AssertionError("never shown:\n" + "\n".join(self.shown))

    async def has(self, text: str, since: int = 0) -> list[str]:
        """Wait until a line shown (from line `since` on) contains `text`; every line shown."""
        return await self.until(lambda shown: any(text in line for line in shown[since:]))


@asynccontextmanager
async def chat(link: FakeLink) -> AsyncIterator[Script]:
    """The chat in lobby with a `Script` console, until the block ends (then /quit)."""
    script = Script()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ChatSession(link, script).run, "lobby")
        await script.has("joined lobby")
        yield script
        script.type(End.INTERRUPT)


async def command(script: Script, line: str, answer: str) -> list[str]:
    """Once what was delivered is taken, type `line`; the lines shown once a new one
    contains `answer`."""
    await trio.testing.wait_all_tasks_blocked()
    since = len(script.shown)
    script.type(line)
    return await script.has(answer, since)


def snapshot(link: FakeLink, room: str, *members: str) -> None:
    body = {"room": room, "members": list(members)}
    link.deliver(f"/presence/{room}", "", json.dumps(body), headers=(("presence", "snapshot"),))


def change(link: FakeLink, room: str, kind: str, who: str) -> None:
    body = {"room": room, "who": who}
    link.deliver(f"/presence/{room}", "", json.dumps(body), headers=(("presence", kind),))


# ---------------------------------------------------------------- rights: pure


def test_rights_are_checked_as_the_server_does() -> None:
    rights = policy(subscribe=["lobby", "team.alice.#"], publish=["lobby"], message=["bob"])
    assert rights.may_join("lobby") and not rights.may_join("lobby.x")
    assert rights.may_join("team.alice") and rights.may_join("team.alice.plans")
    assert not rights.may_join("team.bob")
    assert rights.may_join("team.alice.*") and rights.may_join("team.alice.#")  # contained
    assert not rights.may_join("team.*") and not rights.may_join("#")  # would reach others
    assert policy(subscribe=["#"]).may_join("#")
    assert rights.may_publish("lobby") and not rights.may_publish("team.alice")
    assert rights.may_message("bob") and not rights.may_message("carol")
    assert policy(message=["*"]).may_message("carol")


@pytest.mark.parametrize(
    "answer",
    [
        {"subscribe": [], "publish": [], "message": [], "admin": False},  # no sub
        {"sub": "alice", "subscribe": "#", "publish": [], "message": [], "admin": False},
        {"sub": "alice", "subscribe": [], "publish": [], "message": [], "admin": "yes"},
        {"sub": "alice", "subscribe": ["a..b"], "publish": [], "message": [], "admin": False},
    ],
)
def test_rights_refuse_an_answer_that_is_not_section_9(answer: dict[str, Any]) -> None:
    with pytest.raises(BadResponse, match="/auth/me"):
        Rights.of(answer)


# ---------------------------------------------------------------- frames: pure


def message_frame(*headers: tuple[str, str], body: bytes = b"") -> Frame:
    return Frame("MESSAGE", (("subscription", "sub-1"), ("message-id", "m1"), *headers), body)


def test_a_direct_message_knows_both_parties() -> None:
    frame = message_frame(
        ("destination", "/user/bob"), ("sender", "alice"), ("to", "bob"), ("timestamp", "5")
    )
    message = Message.of(frame)
    assert message.direct and message.to == "bob"
    assert message.other_party("bob") == "alice"
    assert message.other_party("alice") == "bob"
    own = Message.of(message_frame(("destination", "/user/alice"), *frame.headers[3:]))
    assert own.other_party("alice") == "bob"


def test_presence_news_has_no_sender_and_parses() -> None:
    body = json.dumps({"room": "dev", "members": ["alice", "bob"]}).encode()
    frame = message_frame(("destination", "/presence/dev"), ("presence", "snapshot"), body=body)
    news = Presence.of(Message.of(frame))
    assert news == Presence("dev", "snapshot", ("alice", "bob"))
    joined = message_frame(
        ("destination", "/presence/dev"), ("presence", "join"), body=b'{"room":"dev","who":"c"}'
    )
    assert Presence.of(Message.of(joined)) == Presence("dev", "join", ("c",))


@pytest.mark.parametrize(
    ("kind", "body"),
    [("snapshot", b"[]"), ("snapshot", b'{"members": "bob"}'), ("wave", b"{}"), ("join", b"{")],
)
def test_bad_presence_news_is_malformed(kind: str, body: bytes) -> None:
    frame = message_frame(("destination", "/presence/dev"), ("presence", kind), body=body)
    with pytest.raises(MalformedFrame):
        Presence.of(Message.of(frame))


# ---------------------------------------------------------------- /join and rights


async def test_join_of_a_room_not_granted_is_refused_by_the_client() -> None:
    link = FakeLink(policy=policy(subscribe=["lobby"]))
    async with chat(link) as script:
        await command(script, "/join dev", "you may not join dev")
        await command(script, "/rooms", "* rooms: lobby (current)")
    assert "/topic/dev" not in [destination for destination, _ in link.subscribed]
    assert link.asked[-2:] == [False, True]  # the refusal was checked with fresh rights


async def test_a_right_granted_meanwhile_is_seen() -> None:
    link = FakeLink(policy=policy(subscribe=["lobby"]))
    async with chat(link) as script:
        await command(script, "/join dev", "you may not join dev")
        link.policy = policy(subscribe=["lobby", "dev"])  # the operator changed the policy
        await command(script, "/join dev", "* joined dev")
    assert ("/topic/dev", {"last": 20}) in link.subscribed


async def test_rights_that_cannot_be_asked_leave_it_to_the_server() -> None:
    link = FakeLink(policy=None)  # offline, or a server without /auth/me
    async with chat(link) as script:
        await command(script, "/join dev", "* joined dev")
        await command(script, "/msg bob hi", "[@bob] alice: hi")


async def test_a_wildcard_room_must_be_inside_a_grant_and_has_no_presence() -> None:
    link = FakeLink(policy=policy(subscribe=["lobby", "dev.#"]))
    async with chat(link) as script:
        await command(script, "/join *", "* you may not join *")  # it would reach more
        await command(script, "/join dev.*", "* joined dev.*")
        await command(script, "/who", "* dev.* is a wildcard room: /who works in a plain room")
    assert link.subscribed[-1] == ("/topic/dev.*", {})


async def test_talking_where_we_may_not_publish_is_refused() -> None:
    link = FakeLink(policy=policy(subscribe=["lobby"], publish=[]))
    async with chat(link) as script:
        await command(script, "hello", "* you may not talk in lobby: not sent: 'hello'")
    assert link.sent == []


async def test_join_with_a_conversation_name_points_to_dm() -> None:
    async with chat(FakeLink()) as script:
        await command(script, "/join @bob", "* @bob is a conversation: /dm bob")


# ---------------------------------------------------------------- direct messages


async def test_msg_to_someone_not_granted_is_refused() -> None:
    link = FakeLink(policy=policy(subscribe=["lobby"], publish=["lobby"], message=["carol"]))
    async with chat(link) as script:
        await command(script, "/msg bob hi", "* you may not message bob")
        await command(script, "/msg carol  hi  there ", "[@carol] alice: hi  there")
        await command(script, "/rooms", "* rooms: lobby (current); conversations: @carol")
    assert link.sent == [("/user/carol", "hi  there")]


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("/msg", "* usage: /msg NAME TEXT"),
        ("/msg bob", "* usage: /msg NAME TEXT"),
        ("/dm", "* usage: /dm NAME"),
        ("/dm bob carol", "* usage: /dm NAME"),
        ("/dm b\x07b", "is not a name"),
    ],
)
async def test_direct_message_commands_say_how(line: str, answer: str) -> None:
    link = FakeLink()
    async with chat(link) as script:
        await command(script, line, answer)
    assert link.sent == []


async def test_dm_makes_the_conversation_current() -> None:
    link = FakeLink()
    async with chat(link) as script:
        await command(script, "/dm @bob", "* now talking to bob")
        script.type("just for you")
        await script.has("09:08:33 [@bob] alice: just for you")
        assert script.prompts[-1] == "[@bob] > "
        await command(script, "/join lobby", "* now talking in lobby")
        await command(script, "in the room", "[lobby] alice: in the room")
    assert link.sent == [("/user/bob", "just for you"), ("/topic/lobby", "in the room")]


async def test_both_sides_name_the_other_party() -> None:
    bob = FakeLink("bob")
    async with chat(bob) as script:
        bob.deliver("/user/bob", "alice", "hi bob", to="bob")  # bob's copy
        await script.has("09:08:33 [@alice] alice: hi bob")
        await command(script, "/rooms", "* rooms: lobby (current); conversations: @alice")
    alice = FakeLink("alice")
    async with chat(alice) as script:
        alice.deliver("/user/alice", "alice", "hi bob", to="bob")  # alice's own copy
        await script.has("09:08:33 [@bob] alice: hi bob")
        alice.deliver("/user/alice", "alice", "note", to="alice")  # to herself: stored once
        await script.has("09:08:33 [@alice] alice: note")


async def test_inbox_history_is_shown_but_opens_no_conversation() -> None:
    link = FakeLink()
    async with chat(link) as script:
        link.deliver("/user/alice", "bob", "while you were away", to="alice", history=True)
        await script.has("[@bob] bob: while you were away")
        await command(script, "/rooms", "* rooms: lobby (current)")
    assert link.subscribed[0] == ("/user/alice", {"last": 20})  # before any room


async def test_dm_rendering_on_a_screen(tmp_path: Path) -> None:
    link, terminal = FakeLink("bob"), Terminal(60, 8)
    async with chatting(link, terminal, tmp_path / "h") as screen:
        link.deliver("/user/bob", "alice", "psst", to="bob")
        await terminal.has("09:08:33 [@alice] alice: psst")
        screen.keys.send_text("/dm alice\rback at you\r")
        await terminal.has("09:08:33 [@alice] bob: back at you")
        await terminal.has("[@alice] >")
        own = terminal.char(*terminal.find("bob: back"))
        other = terminal.char(*terminal.find("alice: psst"))
        assert (own.fg, other.fg) == ("green", "brown")
        assert terminal.char(*terminal.find("[@alice] bob")).fg == "cyan"
    assert link.sent == [("/user/alice", "back at you")]


# ---------------------------------------------------------------- presence


async def test_who_lists_the_room_and_joins_and_leaves_are_lines() -> None:
    link = FakeLink()
    async with chat(link) as script:
        await command(script, "/who", "* who is in lobby is not known yet")
        snapshot(link, "lobby", "alice", "bob")
        await command(script, "/who", "* in lobby: alice, bob")
        change(link, "lobby", "join", "carol")
        await script.has("* carol joined lobby")
        change(link, "lobby", "leave", "bob")
        await script.has("* bob left lobby")
        await command(script, "/who lobby", "* in lobby: alice, carol")
    joins = [line for line in script.shown if "joined lobby" in line or "left lobby" in line]
    assert joins == ["* joined lobby", "* carol joined lobby", "* bob left lobby"]


async def test_our_own_comings_and_goings_are_not_announced() -> None:
    link = FakeLink()
    async with chat(link) as script:
        snapshot(link, "lobby", "bob")  # a resubscription may come before the room's
        change(link, "lobby", "join", "alice")
        change(link, "lobby", "join", "carol")
        await script.has("* carol joined lobby")
        await command(script, "/who", "* in lobby: alice, bob, carol")
    assert not any("alice joined" in line for line in script.shown)


async def test_a_fresh_snapshot_replaces_what_was_known() -> None:
    link = FakeLink()
    async with chat(link) as script:
        snapshot(link, "lobby", "alice", "bob")
        await command(script, "/who", "* in lobby: alice, bob")
        link.go_offline()
        link.go_online()
        snapshot(link, "lobby", "alice", "carol")  # after the reconnect: who is there now
        await command(script, "/who", "* in lobby: alice, carol")
    assert not any("bob left" in line or "carol joined" in line for line in script.shown)


async def test_who_elsewhere() -> None:
    async with chat(FakeLink()) as script:
        await command(script, "/who dev", "* you are not in dev")
        await command(script, "/dm bob", "now talking to bob")
        await command(script, "/who", "* @bob is you and bob")


async def test_bad_presence_news_is_a_line_not_the_end() -> None:
    link = FakeLink()
    async with chat(link) as script:
        link.deliver("/presence/lobby", "", "{", headers=(("presence", "snapshot"),))
        await script.has("* who is in /presence/lobby: a presence MESSAGE without")
        snapshot(link, "lobby", "alice")
        await command(script, "/who", "* in lobby: alice")


# ---------------------------------------------------------------- /rooms and /leave


async def test_rooms_and_conversations_and_leaving_them() -> None:
    link = FakeLink()
    async with chat(link) as script:
        await command(script, "/join dev", "* joined dev")
        await command(script, "/dm bob", "now talking to bob")
        link.deliver("/user/alice", "carol", "hello?", to="alice")
        await script.has("[@carol] carol: hello?")
        shown = await command(script, "/rooms", "* rooms:")
        assert shown[-1] == "* rooms: lobby, dev; conversations: @bob (current), @carol"
        await command(script, "/leave", "* left @bob; now talking in @carol")
        await command(script, "/leave dev", "* left dev; now talking in @carol")
        await command(script, "/leave @carol", "* left @carol; now talking in lobby")
        await command(script, "/leave @carol", "* you are not in @carol")
        await command(script, "/rooms", "* rooms: lobby (current)")
    assert link.unsubscribed == ["/presence/dev", "/topic/dev"]  # the inbox stays


async def test_a_room_the_policy_took_away_is_left() -> None:
    link = FakeLink()
    async with chat(link) as script:
        await command(script, "/join dev", "* joined dev")
        snapshot(link, "dev", "alice")
        reason = "the server sent ERROR: forbidden: the policy no longer lets alice subscribe"
        link.emit(Refused("/topic/dev", reason))  # resubscribing after a reconnect
        link.emit(Refused("/presence/dev", reason))  # said once, for the room
        await script.has("* the server's policy does not let you read dev (any more): left it")
        assert script.prompts[-1] == "> "  # at once: what is being typed goes nowhere unseen
        await command(script, "hello", "* you are in no room: /join ROOM or /dm NAME first")
        assert link.sent == []
        await command(script, "/rooms", "* rooms: lobby")
    assert link.unsubscribed == ["/presence/dev"]
    assert sum("does not let you read" in line for line in script.shown) == 1
    said = describe(Refused("/topic/dev", reason))
    assert said == f"dev: {reason}"  # what --listen and pipes print


async def test_help_names_every_command() -> None:
    async with chat(FakeLink()) as script:
        shown = await command(script, "/help", "anything else is sent")
    text = "\n".join(shown)
    for command_line in ("/join ROOM", "/dm NAME", "/msg NAME TEXT", "/leave [ROOM]", "/who"):
        assert command_line in text
    assert "[@NAME]" in text and "@NAME" in text.split("/leave")[1]
