"""Rooms with rights, direct messages and presence, end to end: the chat (`ChatSession` on a
`ResilientSession`) and `chat-client` against the real server over mutual TLS on loopback.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from chat.client.resilient import Reconnecting
from chat.client.rights import fetch_rights
from chat.client.terminal import ChatSession, End
from tests.conftest import RunningServer, StartServer, TestPki
from tests.test_client_cli import background, cli_args, one_error_line, read_until, run_cli
from tests.test_client_resilience import Servers, resilient_as, restartable
from tests.test_client_rooms import FAST, Script

# alice reads the lobby and her team's rooms, talks in the lobby, and messages bob alone.
POLICY = """\
[[rule]]
who = ["*"]
subscribe = ["lobby", "team.{sub}.#"]
publish = ["lobby"]
message = ["bob"]
"""


@asynccontextmanager
async def chatting_as(
    server: RunningServer,
    pki: TestPki,
    name: str,
) -> AsyncIterator[Script]:
    """`name`'s chat in lobby, once it takes typed lines, until the block ends."""
    console = Script()
    async with (
        resilient_as(server.ws_url, server, pki, name) as session,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(ChatSession(session, console).run, "lobby")
        await console.until(lambda _: bool(console.prompts))  # subscribed: inbox, lobby, presence
        yield console
        console.type(End.INTERRUPT)


async def said(console: Script, line: str, answer: str) -> list[str]:
    """Type `line`; the lines shown once a new one contains `answer`."""
    since = len(console.shown)
    console.type(line)
    return await console.has(answer, since)


async def who(console: Script, answer: str) -> None:
    """/who until it answers `answer` (a presence snapshot arrives soon after a SUBSCRIBE:
    before it, /who says who is there is not known yet)."""
    with trio.fail_after(FAST):
        while True:
            since = len(console.shown)
            console.type("/who")
            shown = await console.until(
                lambda lines, since=since: any(
                    line.startswith(("* in ", "* who is")) for line in lines[since:]
                )
            )
            if answer in shown[since:]:
                return


# ---------------------------------------------------------------- direct messages


async def test_a_direct_message_shows_on_both_sides_and_every_device(
    server: RunningServer, pki: TestPki
) -> None:
    async with AsyncExitStack() as stack:
        alice = await stack.enter_async_context(chatting_as(server, pki, "alice"))
        phone = await stack.enter_async_context(chatting_as(server, pki, "alice"))
        bob = await stack.enter_async_context(chatting_as(server, pki, "bob"))
        carol = await stack.enter_async_context(chatting_as(server, pki, "carol"))
        alice.type("/msg bob hello bob")
        await alice.has("[@bob] alice: hello bob")
        await phone.has("[@bob] alice: hello bob")  # alice's copy, on her other device
        await bob.has("[@alice] alice: hello bob")
        await said(bob, "/dm alice", "now talking to alice")
        bob.type("hello alice")
        for console in (alice, phone, bob):
            await console.has("[@alice] bob: hello alice" if console is bob else "[@bob] bob:")
        await said(alice, "/rooms", "* rooms: lobby (current); conversations: @bob")
        bob.type("/join lobby", "in the lobby now")
        await carol.has("[lobby] bob: in the lobby now")  # after the direct messages
    assert not any("hello" in line for line in carol.shown)


async def test_send_to_an_inbox_and_listen_to_conversations(
    server: RunningServer, pki: TestPki
) -> None:
    """`--send @bob`; bob's `--listen @alice` prints only alice's, `--listen @` both."""
    with_alice = cli_args(server, pki, "bob", "--listen", "@alice", "--json", "--count", "1")
    everyone = cli_args(server, pki, "bob", "--listen", "@", "--count", "2")
    async with trio.open_nursery() as nursery:
        one = await nursery.start(background(with_alice))
        both = await nursery.start(background(everyone))
        await read_until(one.stderr, bytearray(), "* listening on @alice")
        await read_until(both.stderr, bytearray(), "* listening on @")
        for name, text in (("carol", "not for that one"), ("alice", "hi, bob")):
            sent = await run_cli(cli_args(server, pki, name, "--send", "@bob", text))
            assert sent.returncode == 0, sent
        json_out, plain_out = bytearray(), bytearray()
        await read_until(one.stdout, json_out, "\n")
        await read_until(both.stdout, plain_out, "hi, bob\n")
        with trio.fail_after(FAST):
            assert await one.wait() == 0 and await both.wait() == 0
    record = json.loads(json_out.decode())
    assert (record["room"], record["sender"], record["to"]) == ("@alice", "alice", "bob")
    assert (record["destination"], record["body"]) == ("/user/bob", "hi, bob")
    lines = plain_out.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[@carol] carol: not for that one",
        "[@alice] alice: hi, bob",
    ]


async def test_a_direct_message_sent_while_away_comes_after_the_reconnect(
    nursery: trio.Nursery, pki: TestPki, tmp_path: Path
) -> None:
    servers: Servers = restartable(nursery, pki, tmp_path)
    first = await servers.start()
    async with chatting_as(first, pki, "alice") as alice:
        await servers.stop()
        await alice.until(lambda _: any(isinstance(e, Reconnecting) for e in alice.links))
        aside = await servers.start(elsewhere=True)  # same state, alice is not connected
        sent = await run_cli(cli_args(aside, pki, "bob", "--send", "@alice", "while you were out"))
        assert sent.returncode == 0, sent
        await servers.stop()
        await servers.start()
        await alice.has("[@bob] bob: while you were out")
        await who(alice, "* in lobby: alice")  # presence made afresh
    assert not any("may be missing" in line for line in alice.shown)


# ---------------------------------------------------------------- presence


async def test_who_and_join_and_leave_lines(server: RunningServer, pki: TestPki) -> None:
    async with chatting_as(server, pki, "alice") as alice:
        await who(alice, "* in lobby: alice")
        async with chatting_as(server, pki, "bob") as bob:
            await alice.has("* bob joined lobby")
            await said(alice, "/who", "* in lobby: alice, bob")
            await said(bob, "/join dev", "* joined dev")
            await said(bob, "/leave lobby", "* left lobby")
            await alice.has("* bob left lobby")
            await said(alice, "/who", "* in lobby: alice")
            await who(bob, "* in dev: bob")
    assert not any("alice joined" in line for line in alice.shown)


# ---------------------------------------------------------------- rights


async def test_rights_come_from_auth_me_with_sub_expanded(
    start_server: StartServer, pki: TestPki, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.toml"
    acl.write_text(POLICY)
    server = await start_server(acl=acl)
    rights = await fetch_rights(server.base_url, pki.client_context("alice"))
    assert (rights.sub, rights.subscribe) == ("alice", ("lobby", "team.alice.#"))
    assert (rights.publish, rights.message, rights.admin) == (("lobby",), ("bob",), False)


async def test_forbidden_rooms_and_names_are_refused_and_the_link_stays(
    start_server: StartServer, pki: TestPki, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.toml"
    acl.write_text(POLICY)
    server = await start_server(acl=acl)
    async with chatting_as(server, pki, "alice") as alice:
        await said(alice, "/join dev", "* you may not join dev")
        await said(alice, "/join team.bob", "* you may not join team.bob")
        await said(alice, "/join team.*", "* you may not join team.*")
        await said(alice, "/join team.alice.#", "* joined team.alice.#")
        await said(alice, "/join team.alice.plans", "* joined team.alice.plans")
        await said(alice, "/msg carol psst", "* you may not message carol")
        await said(alice, "hello", "* you may not talk in team.alice.plans")
        await said(alice, "/msg bob psst", "[@bob] alice: psst")
        await said(alice, "/join lobby", "* now talking in lobby")
        await said(alice, "still here", "[lobby] alice: still here")
    assert not any(isinstance(event, Reconnecting) for event in alice.links)
    refused = await run_cli(cli_args(server, pki, "alice", "--send", "@carol", "psst"))
    assert "forbidden" in one_error_line(refused)  # one-shot: the server's word, one line


async def test_a_room_the_policy_takes_away_is_left_and_the_chat_goes_on(
    start_server: StartServer, pki: TestPki, tmp_path: Path
) -> None:
    """The operator edits the policy: the server closes the connection (ERROR forbidden);
    the resubscription is refused too, so the chat drops the room and carries on, and a
    --listen on that room ends with one line."""
    acl = tmp_path / "acl.toml"
    acl.write_text(POLICY.replace('"lobby", "team', '"lobby", "dev", "team'))
    server = await start_server(acl=acl)
    async with chatting_as(server, pki, "alice") as alice, trio.open_nursery() as nursery:
        listener = await nursery.start(background(cli_args(server, pki, "bob", "--listen", "dev")))
        await read_until(listener.stderr, bytearray(), "* listening on dev")
        await said(alice, "/join dev", "* joined dev")
        replaced = tmp_path / "acl.new"
        replaced.write_text(POLICY)
        replaced.rename(acl)
        await alice.has("* the server's policy does not let you read dev (any more): left it")
        await said(alice, "/rooms", "* rooms: lobby")  # no line typed goes anywhere unseen
        await said(alice, "/join lobby", "* now talking in lobby")
        await said(alice, "back to normal", "[lobby] alice: back to normal")
        errors = bytearray()
        await read_until(listener.stderr, errors, "chat-client: listening on dev ended: ")
        with trio.fail_after(FAST):
            assert await listener.wait() == 2
    assert "forbidden" in errors.decode().splitlines()[-1]
