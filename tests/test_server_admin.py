"""The admin routes (PROTOCOL.md §12) on a running server: only for identities the policy
makes admin, publish (to a topic, or a direct message) as the admin identity, the list of live
connections, and disconnecting an identity with ERROR + 1008.

Most cases run below TLS on the mock clock (tests/below_tls.py); the connection list's `peer`
is an address only over real TLS, so that case runs on loopback.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from tests.below_tls import BASE, BelowTls
from tests.conftest import (
    HttpReply,
    RunningServer,
    StompPeer,
    TestPki,
    http_request,
    stomp_peer,
)
from tests.test_server_acl import subscribed
from tests.test_server_rooms import POLICY  # carol is the admin; alice and bob are not
from tests.test_server_sessions import closed_with

ROUTES = [
    ("POST", "/admin/publish", b'{"destination": "/topic/lobby", "body": "hi"}'),
    ("GET", "/admin/connections", b""),
    ("POST", "/admin/disconnect", b'{"sub": "bob"}'),
]


async def start(start_below_tls, tmp_path: Path) -> BelowTls:
    acl = tmp_path / "policy.toml"
    acl.write_text(POLICY)
    below: BelowTls = await start_below_tls(acl=acl)
    return below


async def admin(below: BelowTls, method: str, path: str, payload: object = None) -> HttpReply:
    body = b"" if payload is None else json.dumps(payload).encode()
    return await below.http("carol", method, path, body=body)


async def receipt(peer: StompPeer, receipt_id: str) -> None:
    frame = await peer.receive()
    assert (frame.command, frame.get("receipt-id")) == ("RECEIPT", receipt_id), frame


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
async def test_an_identity_that_is_not_admin_is_refused_403(
    start_below_tls, autojump_clock, tmp_path: Path, method: str, path: str, body: bytes
) -> None:
    below = await start(start_below_tls, tmp_path)
    async with below.stomp_peer("bob") as bob:
        await subscribed(bob, "/topic/lobby", "lobby")
        reply = await below.http("alice", method, path, body=body)
        assert (reply.status, reply.json()["error"]) == (403, "forbidden")
        assert "alice" in reply.json()["detail"]
        await bob.send("SEND", {"destination": "/topic/lobby", "receipt": "still-here"}, b"x")
        frame = await bob.receive()  # nothing was published, bob was not disconnected
        assert (frame.command, frame.get("sender")) == ("MESSAGE", "bob"), frame


async def test_publish_to_a_topic_reaches_a_subscriber_as_the_admin(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start(start_below_tls, tmp_path)
    async with below.stomp_peer("bob") as bob:
        await subscribed(bob, "/topic/lobby", "lobby")
        # carol may publish only to ops.#: an admin's publish is not bound by those rules
        reply = await admin(
            below, "POST", "/admin/publish", {"destination": "/topic/lobby", "body": "maintenance"}
        )
        assert reply.status == 200, reply
        answer = reply.json()
        message = await bob.receive()
        assert message.command == "MESSAGE"
        assert message.get("sender") == "carol"
        assert message.body == b"maintenance"
        assert message.get("content-type") == "text/plain;charset=utf-8"
        assert answer == {"offset": int(message.get("offset")), "epoch": message.get("epoch")}
        again = await admin(
            below,
            "POST",
            "/admin/publish",
            {"destination": "/topic/lobby", "body": "{}", "content_type": "application/json"},
        )
        assert again.json()["offset"] == answer["offset"] + 1
        message = await bob.receive()
        assert (message.get("content-type"), message.body) == ("application/json", b"{}")


async def test_publish_to_a_user_lands_in_both_inboxes_with_to(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start(start_below_tls, tmp_path)
    async with below.stomp_peer("bob") as bob, below.stomp_peer("carol") as carol:
        await subscribed(bob, "/user/bob", "inbox")
        await subscribed(carol, "/user/carol", "inbox")
        reply = await admin(
            below, "POST", "/admin/publish", {"destination": "/user/bob", "body": "psst"}
        )
        assert reply.status == 200, reply
        to_bob, to_carol = await bob.receive(), await carol.receive()
        for message, inbox in ((to_bob, "/user/bob"), (to_carol, "/user/carol")):
            assert message.get("destination") == inbox
            assert (message.get("sender"), message.get("to"), message.body) == (
                "carol",
                "bob",
                b"psst",
            )
        assert reply.json() == {"offset": int(to_bob.get("offset")), "epoch": to_bob.get("epoch")}


@pytest.mark.parametrize(
    ("path", "body", "said"),
    [
        ("/admin/publish", b"", "body is not JSON"),
        ("/admin/publish", b"[]", "body must be a JSON object"),
        ("/admin/publish", b'{"destination": "/topic/lobby"}', "body has no body"),
        ("/admin/publish", b'{"body": "x"}', "body has no destination"),
        ("/admin/publish", b'{"destination": "/topic/a", "body": 1}', "body must be a string"),
        ("/admin/publish", b'{"destination": "/topic/a", "body": "", "x": ""}', "unknown fields"),
        ("/admin/publish", b'{"destination": "/topic/a.*", "body": ""}', "wildcards"),
        ("/admin/publish", b'{"destination": "/presence/lobby", "body": ""}', "announces"),
        ("/admin/publish", b'{"destination": "lobby", "body": ""}', "must start with"),
        ("/admin/publish", b'{"destination": "/session/token", "body": ""}', "must start with"),
        ("/admin/publish", b'{"destination": "/user/b b", "body": ""}', "an inbox is"),
        ("/admin/publish", b'{"destination": "/topic/a", "body": "\\ud800"}', "lone surrogate"),
        (
            "/admin/publish",
            b'{"destination": "/topic/a", "body": "", "content_type": "a\\nb"}',
            "content_type must be",
        ),
        ("/admin/disconnect", b"{}", "body has no sub"),
        ("/admin/disconnect", b'{"sub": null}', "sub must be a string, not null"),
        ("/admin/disconnect", b'{"sub": "bob\\n"}', "sub is not an identity"),
    ],
)
async def test_a_bad_body_is_refused_400_saying_why(
    start_below_tls, autojump_clock, tmp_path: Path, path: str, body: bytes, said: str
) -> None:
    below = await start(start_below_tls, tmp_path)
    reply = await below.http("carol", "POST", path, body=body)
    assert (reply.status, reply.json()["error"]) == (400, "invalid_request"), reply
    assert said in reply.json()["detail"]


async def test_connections_lists_every_live_connection_with_its_subscriptions(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start(start_below_tls, tmp_path)
    async with below.stomp_peer("alice") as alice:
        await subscribed(alice, "/topic/lobby", "a")
        await subscribed(alice, "/topic/dev.#", "b")
        async with below.stomp_peer("bob") as bob:
            await subscribed(bob, "/user/bob", "c")
            reply = await admin(below, "GET", "/admin/connections")
            assert reply.status == 200, reply
            assert reply.headers["content-type"] == "application/json"
            listed = {entry["sub"]: entry for entry in reply.json()}
            assert listed.keys() == {"alice", "bob"}
            assert listed["alice"]["subscriptions"] == ["/topic/lobby", "/topic/dev.#"]
            assert listed["bob"]["subscriptions"] == ["/user/bob"]
            # ISO 8601 UTC by the server's wall clock, which starts at BASE below TLS
            opened = datetime.fromtimestamp(BASE, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            assert listed["alice"]["since"] == listed["bob"]["since"] == opened
            await alice.send("UNSUBSCRIBE", {"id": "a", "receipt": "gone"})
            await receipt(alice, "gone")
        reply = await admin(below, "GET", "/admin/connections")
        assert [(e["sub"], e["subscriptions"]) for e in reply.json()] == [
            ("alice", ["/topic/dev.#"])
        ]


async def test_connections_shows_each_peer_address_over_tls(
    start_server, pki: TestPki, tmp_path: Path
) -> None:
    acl = tmp_path / "policy.toml"
    acl.write_text(POLICY)
    server = await start_server(acl=acl)
    async with stomp_peer(server, pki, "bob") as bob:
        await subscribed(bob, "/topic/lobby", "lobby")
        reply = await http_request(server, pki.client_context("carol"), "GET", "/admin/connections")
        assert reply.status == 200, reply
        [entry] = reply.json()
        assert entry["sub"] == "bob"
        assert entry["subscriptions"] == ["/topic/lobby"]
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["peer"]), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["since"]), entry


async def test_disconnect_closes_every_connection_of_the_identity_and_no_other(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start(start_below_tls, tmp_path)
    async with (
        below.stomp_peer("bob") as bob1,
        below.stomp_peer("bob") as bob2,
        below.stomp_peer("alice") as alice,
    ):
        reply = await admin(below, "POST", "/admin/disconnect", {"sub": "bob"})
        assert (reply.status, reply.json()) == (200, {"disconnected": 2})
        await closed_with(bob1, "disconnected by admin", 1008)
        await closed_with(bob2, "disconnected by admin", 1008)
        await alice.send("SEND", {"destination": "/topic/lobby", "receipt": "ok"}, b"x")
        await receipt(alice, "ok")
        reply = await admin(below, "POST", "/admin/disconnect", {"sub": "nobody"})
        assert (reply.status, reply.json()) == (200, {"disconnected": 0})


# ---------------------------------------------------------------- chat-server admin (the CLI)


async def admin_cli(
    server: RunningServer, pki: TestPki, name: str, *args: str
) -> tuple[int, str, str]:
    """`chat-server admin ACTION ... --cert NAME.crt --url ...` as a process; (status, out, err)."""
    action, *rest = args
    command = [sys.executable, "-m", "chat.server.cli", "admin", action, *rest]
    command += ["--cert", str(pki.client(name)[0]), "--url", f"https://127.0.0.1:{server.port}"]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_the_admin_command_publishes_lists_and_disconnects(
    start_server, pki: TestPki, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.toml"
    acl.write_text(POLICY)
    server: RunningServer = await start_server(acl=acl)
    async with stomp_peer(server, pki, "bob") as bob:
        await subscribed(bob, "/topic/lobby", "s")
        status, out, _ = await admin_cli(server, pki, "carol", "publish", "/topic/lobby", "hi")
        assert (status, out) == (0, "stored at offset 1 (epoch " + out.split("epoch ")[1])
        message = await bob.receive()
        assert (message.get("sender"), message.body) == ("carol", b"hi")
        status, out, _ = await admin_cli(server, pki, "carol", "connections")
        header, row = out.splitlines()
        assert header.split() == ["SUB", "PEER", "SINCE", "SUBSCRIPTIONS"]
        assert row.split()[0] == "bob" and row.split()[-1] == "/topic/lobby"
        status, out, _ = await admin_cli(server, pki, "carol", "connections", "--json")
        assert [c["sub"] for c in json.loads(out)] == ["bob"]
        status, out, _ = await admin_cli(server, pki, "carol", "disconnect", "bob")
        assert (status, out) == (0, "disconnected 1 connection(s)\n")
        await closed_with(bob, "disconnected by admin", 1008)


async def test_the_admin_command_says_why_it_was_refused_in_one_line(
    start_server, pki: TestPki, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.toml"
    acl.write_text(POLICY)
    server: RunningServer = await start_server(acl=acl)
    status, out, err = await admin_cli(server, pki, "alice", "disconnect", "bob")
    assert (status, out) == (2, "")
    assert err.startswith("chat-server: POST /admin/disconnect refused: HTTP 403 forbidden: ")
    assert len(err.splitlines()) == 1
