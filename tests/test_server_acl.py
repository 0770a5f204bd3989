"""The policy file on a running server (PROTOCOL.md §9-§11): written on first start, refused
with one line when wrong, re-read when it changes (a subscription it no longer allows ends
with ERROR forbidden and 1008 within 2 s), GET /auth/me, and presence and direct messages
over real connections.

Reload cases run below TLS on the mock clock (tests/below_tls.py); the CLI cases run
`chat-server` itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from chat.protocol.policy import DEFAULT_POLICY
from tests.below_tls import BelowTls
from tests.conftest import RunningServer, StompPeer, TestPki, http_request
from tests.test_server_cli import one_line_error, run
from tests.test_server_rooms import POLICY
from tests.test_server_sessions import closed_with

POLL = 0.5  # the server's file poll in these tests (revocation_poll)


def write_policy(path: Path, text: str) -> None:
    """Replace the file by a rename, as editors and config tools do."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


async def start_with_policy(start_below_tls, tmp_path: Path, text: str = POLICY) -> BelowTls:
    acl = tmp_path / "policy.toml"
    acl.write_text(text)
    below: BelowTls = await start_below_tls(acl=acl, revocation_poll=POLL)
    return below


async def subscribed(peer: StompPeer, destination: str, sub_id: str) -> None:
    await peer.send("SUBSCRIBE", {"destination": destination, "id": sub_id, "receipt": sub_id})
    frame = await peer.receive()
    assert (frame.command, frame.get("receipt-id")) == ("RECEIPT", sub_id), frame


# ---------------------------------------------------------------- the file


async def test_first_start_writes_the_default_policy_and_keeps_an_edited_one(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below: BelowTls = await start_below_tls()
    acl = below.config.state_dir / "acl.toml"
    assert acl.read_text() == DEFAULT_POLICY
    assert oct(acl.stat().st_mode & 0o777) == oct(0o644)
    acl.write_text(POLICY)
    again: BelowTls = await start_below_tls()  # same state directory
    assert acl.read_text() == POLICY
    reply = await again.http("alice", "GET", "/auth/me")
    assert reply.json()["subscribe"] == ["lobby", "dev.#", "team.alice.#"]


def test_an_acl_file_that_does_not_exist_stops_the_start(tmp_path: Path, pki: TestPki) -> None:
    missing = tmp_path / "nope.toml"
    result = run("--acl", str(missing), "--certs-dir", str(pki.dir), "--port", "0",
                 "--state-dir", str(tmp_path / "state"))  # fmt: skip
    line = one_line_error(result)
    assert line.startswith(f"chat-server: {missing}"), line


def test_an_acl_file_with_an_error_stops_the_start_naming_the_line(
    tmp_path: Path, pki: TestPki
) -> None:
    acl = tmp_path / "acl.toml"
    acl.write_text(POLICY.replace('who = ["@ops"]', 'who = ["@opps"]'))
    result = run("--acl", str(acl), "--certs-dir", str(pki.dir), "--port", "0",
                 "--state-dir", str(tmp_path / "state"))  # fmt: skip
    line = one_line_error(result)
    assert line.startswith(f"chat-server: {acl}:11:"), line
    assert "opps" in line


# ---------------------------------------------------------------- GET /auth/me


async def test_auth_me_says_what_the_identity_may_do(server: RunningServer, pki: TestPki) -> None:
    reply = await http_request(server, pki.client_context("alice"), "GET", "/auth/me")
    assert reply.status == 200
    assert reply.json() == {
        "sub": "alice",
        "subscribe": ["#"],
        "publish": ["#"],
        "message": ["*"],
        "admin": False,
    }


async def test_auth_me_expands_sub_and_groups(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start_with_policy(start_below_tls, tmp_path)
    alice = (await below.http("alice", "GET", "/auth/me")).json()
    carol = (await below.http("carol", "GET", "/auth/me")).json()
    assert alice == {
        "sub": "alice",
        "subscribe": ["lobby", "dev.#", "team.alice.#"],
        "publish": ["lobby", "dev.#"],
        "message": ["*"],
        "admin": False,
    }
    assert (carol["subscribe"], carol["message"], carol["admin"]) == (["#"], [], True)


# ---------------------------------------------------------------- refusals on the wire


async def test_a_forbidden_subscribe_is_error_forbidden_with_its_receipt_then_1008(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start_with_policy(start_below_tls, tmp_path)
    async with below.stomp_peer("alice") as alice, below.stomp_peer("bob") as bob:
        await alice.send("SUBSCRIBE", {"destination": "/topic/#", "id": "1", "receipt": "r1"})
        error = await alice.receive()
        assert (error.command, error.get("message"), error.get("receipt-id")) == (
            "ERROR",
            "forbidden",
            "r1",
        )
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await alice.ws.get_message()
        assert closed.value.reason.code == 1008
        await subscribed(bob, "/topic/lobby", "still-fine")  # nobody else is disturbed


async def test_a_forbidden_send_closes_with_1008(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start_with_policy(start_below_tls, tmp_path)
    async with below.stomp_peer("alice") as alice:
        await alice.send("SEND", {"destination": "/topic/ops.alerts"}, b"x")
        await closed_with(alice, "forbidden", 1008)


# ---------------------------------------------------------------- a live change


async def test_a_policy_change_closes_what_it_no_longer_allows_within_2_s(
    start_below_tls, autojump_clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat.server")
    below = await start_with_policy(start_below_tls, tmp_path)
    async with below.stomp_peer("alice") as alice, below.stomp_peer("bob") as bob:
        await subscribed(alice, "/topic/dev.backend", "a")
        await subscribed(bob, "/topic/lobby", "b")
        changed = trio.current_time()
        write_policy(below.config.acl, POLICY.replace('"lobby", "dev.#", "team', '"lobby", "team'))
        await closed_with(alice, "forbidden", 1008)
        assert trio.current_time() - changed <= 2
        await bob.send("SEND", {"destination": "/topic/lobby", "receipt": "s"}, b"hi")
        frames = [await bob.receive(), await bob.receive()]
        assert {f.command for f in frames} == {"MESSAGE", "RECEIPT"}
    assert any("policy reloaded" in r.getMessage() for r in caplog.records)


async def test_a_broken_policy_on_reload_keeps_the_old_one_and_is_logged(
    start_below_tls, autojump_clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    below = await start_with_policy(start_below_tls, tmp_path)
    async with below.stomp_peer("alice") as alice:
        await subscribed(alice, "/topic/dev.backend", "a")
        write_policy(below.config.acl, "[[rule]]\nwho = [\n")  # half-written
        await trio.sleep(3 * POLL)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors  # once per broken version, not once per poll
        assert errors[0].startswith("policy not reloaded, the previous one stays in force: ")
        assert str(below.config.acl) in errors[0]
        await subscribed(alice, "/topic/dev.other", "b")  # the old policy is in force
        write_policy(below.config.acl, POLICY.replace("dev.#", "devops.#"))
        await closed_with(alice, "forbidden", 1008)


# ---------------------------------------------------------------- presence and DMs on the wire


async def test_presence_snapshot_follows_the_receipt_then_join_and_leave(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start_with_policy(start_below_tls, tmp_path)
    async with below.stomp_peer("carol") as carol, below.stomp_peer("bob") as bob:
        await subscribed(bob, "/topic/lobby", "1")
        await subscribed(carol, "/presence/lobby", "p")  # the RECEIPT comes first
        snapshot = await carol.receive()
        assert (snapshot.get("presence"), snapshot.body) == (
            "snapshot",
            b'{"room":"lobby","members":["bob"]}',
        )
        async with below.stomp_peer("alice") as alice, below.stomp_peer("alice") as phone:
            await subscribed(alice, "/topic/lobby", "1")
            await subscribed(phone, "/topic/lobby", "1")
            join = await carol.receive()
            assert (join.get("presence"), join.body) == ("join", b'{"room":"lobby","who":"alice"}')
        leave = await carol.receive()  # both of her connections closed
        assert (leave.get("presence"), leave.body) == ("leave", b'{"room":"lobby","who":"alice"}')
        assert leave.get("destination") == "/presence/lobby"


async def test_a_direct_message_over_the_wire(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below = await start_with_policy(start_below_tls, tmp_path)
    async with below.stomp_peer("alice") as alice, below.stomp_peer("bob") as bob:
        await subscribed(alice, "/user/alice", "in")
        await subscribed(bob, "/user/bob", "in")
        await alice.send("SEND", {"destination": "/user/bob", "receipt": "dm"}, b"psst")
        frames = {(await alice.receive()).command for _ in range(2)}
        assert frames == {"MESSAGE", "RECEIPT"}  # her own copy, and the RECEIPT
        dm = await bob.receive()
        assert (dm.get("destination"), dm.get("to"), dm.get("sender"), dm.body) == (
            "/user/bob",
            "bob",
            "alice",
            b"psst",
        )
        await bob.send("SUBSCRIBE", {"destination": "/user/alice", "id": "x"})
        await closed_with(bob, "forbidden", 1008)
