"""Token lifecycle in the client (PROTOCOL.md §7): the refresh token file, rotation,
theft detection, fallbacks, handshake expiry, in-band renewal. Real server on loopback;
expiry and renewal below TLS on the mock clock (tests/below_tls.py), where tokens expire
at no cost in real time."""

from __future__ import annotations

import itertools
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import jwt
import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from chat.client.auth import TokenFile, TokenSource, connect_authorized
from chat.client.connection import Message
from chat.client.errors import TokenRefused
from chat.client.http import refresh_token
from chat.client.resilient import Online, Reconnecting, connect_resilient
from chat.pki import server_ssl_context
from tests.below_tls import BASE_URL, URL, BelowTls
from tests.conftest import RunningServer, TestPki
from tests.test_client_cli import CLI, cli_args, run_cli

FAST = 5  # seconds: every wait here is on loopback


def source(
    server: RunningServer, pki: TestPki, name: str, path: Path, notices: list[str] | None = None
) -> TokenSource:
    sink = notices.append if notices is not None else print
    return TokenSource(server.base_url, pki.client_context(name), TokenFile(path), sink)


def below_source(below: BelowTls, name: str, path: Path) -> TokenSource:
    """A TokenSource reaching the server below TLS as `name`."""
    context = below.pki.client_context(name)
    return TokenSource(BASE_URL, context, TokenFile(path), print, dial=below.dial(name))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------- the file and rotation


async def test_token_file_is_private_and_rotated(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    path = tmp_path / "alice.refresh"
    tokens = source(server, pki, "alice", path)
    with umask(0):  # even a umask that lets everyone read new files
        first = await tokens.grant()
    assert mode(path) == 0o600
    assert path.read_text().strip() == first.refresh_token
    second = await tokens.grant()  # the stored token is spent: POST /auth/refresh
    assert mode(path) == 0o600
    assert path.read_text().strip() == second.refresh_token != first.refresh_token
    with pytest.raises(TokenRefused) as spent:
        await refresh_token(server.base_url, pki.client_context("alice"), first.refresh_token)
    assert spent.value.code == "refresh_reused"  # proof the second grant spent the first
    for shown in (repr(first), repr(tokens), repr(TokenFile(path)), str(spent.value)):
        assert first.refresh_token not in shown and first.access_token not in shown
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


async def test_cli_stores_rotates_and_never_prints_tokens(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    path = tmp_path / "alice.refresh"
    args = cli_args(server, pki, "alice", "--token-file", str(path), "--send", "lobby", "hi")
    first = await run_cli(args)
    assert first.returncode == 0, first
    stored = path.read_text().strip()
    assert mode(path) == 0o600
    second = await run_cli(args)
    assert second.returncode == 0, second
    rotated = path.read_text().strip()
    assert rotated != stored and mode(path) == 0o600
    with pytest.raises(TokenRefused) as spent:  # the second run refreshed with the first's
        await refresh_token(server.base_url, pki.client_context("alice"), stored)
    assert spent.value.code == "refresh_reused"
    for result in (first, second):
        output = result.stdout + result.stderr
        assert stored.encode() not in output and rotated.encode() not in output
        assert b"eyJ" not in output  # no JWT either


async def test_default_token_file_is_beside_the_certificate(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    cert, key = pki.client("carol")
    (tmp_path / "carol.crt").write_bytes(cert.read_bytes())
    (tmp_path / "carol.key").write_bytes(key.read_bytes())
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    args = ["--cert", str(tmp_path / "carol.crt"), "--url", server.ws_url, "--send", "lobby", "x"]
    result = await run_cli([*CLI, *args])
    assert result.returncode == 0, result
    assert mode(tmp_path / "carol.refresh") == 0o600


async def test_two_clients_sharing_the_file_never_spend_a_token_twice(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    """Two sources on one file (as two chat-client processes would be) refreshing at once:
    the file lock serializes read-spend-write, so the server never sees a reuse."""
    path = tmp_path / "alice.refresh"
    notices: list[str] = []
    one, two = (source(server, pki, "alice", path, notices) for _ in range(2))
    await one.grant()
    grants = []

    async def refresh(tokens: TokenSource) -> None:
        for _ in range(4):
            grants.append(await tokens.grant())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refresh, one)
        nursery.start_soon(refresh, two)
    assert notices == []
    assert path.read_text().strip() in {g.refresh_token for g in grants}
    assert len({g.refresh_token for g in grants}) == 8


# ---------------------------------------------------------------- refusals and fallbacks


async def test_refresh_token_used_twice_is_said_once(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    """A copy of the file is spent first by someone else: our next start presents a spent
    token, the server revokes the family, we say so in one line and use the certificate."""
    path = tmp_path / "alice.refresh"
    notices: list[str] = []
    tokens = source(server, pki, "alice", path, notices)
    await tokens.grant()
    stolen = path.read_text().strip()
    await refresh_token(server.base_url, pki.client_context("alice"), stolen)  # the thief
    fresh = await tokens.grant()
    assert len(notices) == 1
    assert "used twice" in notices[0] and "revoked" in notices[0] and str(path) in notices[0]
    assert stolen not in notices[0]
    assert path.read_text().strip() == fresh.refresh_token
    async with connect_authorized(
        server.ws_url, pki.client_context("alice"), tokens, grant=fresh
    ) as client:
        assert client.user_name == "alice"


async def test_cli_says_in_one_line_that_the_token_was_reused(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    path = tmp_path / "alice.refresh"
    args = cli_args(server, pki, "alice", "--token-file", str(path), "--send", "lobby", "hi")
    assert (await run_cli(args)).returncode == 0
    await refresh_token(server.base_url, pki.client_context("alice"), path.read_text().strip())
    result = await run_cli(args)
    assert result.returncode == 0, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chat-client: "), lines
    assert "used twice" in lines[0] and "copied" in lines[0]


async def test_thief_after_owner_is_reported_to_the_owner(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    """The owner spent the token first; the thief's replay revokes the family. The owner's
    next refresh is refused as `refresh_reused` too, so the owner hears of the theft, then
    gets a new token from the certificate."""
    path = tmp_path / "alice.refresh"
    notices: list[str] = []
    tokens = source(server, pki, "alice", path, notices)
    await tokens.grant()
    copied = path.read_text().strip()
    await tokens.grant()  # the owner rotates
    with pytest.raises(TokenRefused) as thief:
        await refresh_token(server.base_url, pki.client_context("alice"), copied)
    assert thief.value.code == "refresh_reused"
    grant = await tokens.grant()
    assert len(notices) == 1 and "revoked the token family" in notices[0]
    assert path.read_text().strip() == grant.refresh_token


async def test_token_file_of_another_certificate(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    path = tmp_path / "shared.refresh"
    await source(server, pki, "bob", path).grant()
    notices: list[str] = []
    grant = await source(server, pki, "alice", path, notices).grant()
    assert len(notices) == 1 and "another certificate" in notices[0]
    assert path.read_text().strip() == grant.refresh_token


async def test_token_file_readable_by_others_is_not_used(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    path = tmp_path / "alice.refresh"
    notices: list[str] = []
    tokens = source(server, pki, "alice", path, notices)
    first = await tokens.grant()
    path.chmod(0o644)
    await tokens.grant()
    assert len(notices) == 1 and "readable by other users" in notices[0]
    assert mode(path) == 0o600
    # it was not spent: the exposed token was left alone, a new family was started
    await refresh_token(server.base_url, pki.client_context("alice"), first.refresh_token)


async def test_unusable_token_file_degrades_to_memory(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    """No directory for the file: said once, then the refresh token lives in memory."""
    path = tmp_path / "missing" / "alice.refresh"
    notices: list[str] = []
    tokens = source(server, pki, "alice", path, notices)
    first = await tokens.grant()
    second = await tokens.grant()  # refreshed from memory
    assert len(notices) == 1
    assert str(path) in notices[0] and "in memory only" in notices[0]
    with pytest.raises(TokenRefused) as spent:
        await refresh_token(server.base_url, pki.client_context("alice"), first.refresh_token)
    assert spent.value.code == "refresh_reused" and second.refresh_token != first.refresh_token
    assert not path.parent.exists()


async def test_unknown_refresh_token_falls_back_quietly(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    path = tmp_path / "alice.refresh"
    path.write_text("not-a-token-this-server-issued\n")
    path.chmod(0o600)
    notices: list[str] = []
    grant = await source(server, pki, "alice", path, notices).grant()
    assert notices == [] and path.read_text().strip() == grant.refresh_token


async def test_revoked_identity_is_one_line_with_what_to_do(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    server.server.state.revoke_sub("carol", time.time())
    with pytest.raises(TokenRefused) as refused:
        await source(server, pki, "carol", tmp_path / "carol.refresh").grant()
    assert (refused.value.status, refused.value.code) == (403, "identity_revoked")
    args = cli_args(
        server, pki, "carol", "--token-file", str(tmp_path / "c.refresh"), "--send", "lobby", "x"
    )
    result = await run_cli(args)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "identity_revoked" in lines[0] and "unrevoke" in lines[0]


# ---------------------------------------------------------------- expiry


async def test_expired_token_at_handshake_is_refreshed_once(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    below: BelowTls = await start_below_tls(token_lifetime=1.0, clock_leeway=0.0)
    path = tmp_path / "alice.refresh"
    tokens = below_source(below, "alice", path)
    stale = await tokens.grant()
    expires = jwt.decode(stale.access_token, options={"verify_signature": False})["exp"]
    await trio.sleep(expires - below.server.clock() + 0.1)
    async with connect_authorized(
        str(URL), below.pki.client_context("alice"), tokens, grant=stale
    ) as client:
        # refreshed for the retry (in-band renewal waits at least half a second)
        assert path.read_text().strip() != stale.refresh_token
        await client.subscribe("/topic/lobby")
        await client.send("/topic/lobby", "with a refreshed token")
        with trio.fail_after(FAST):
            assert (await client.receive()).text == "with a refreshed token"


async def test_expired_twice_is_an_error_not_a_loop(
    nursery: trio.Nursery, server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    """A server that finds every token expired (its clock is wrong) gets two handshakes."""
    handshakes = itertools.count()
    body = json.dumps({"error": "token_expired", "detail": "token has expired"}).encode()

    async def handler(request: WebSocketRequest) -> None:
        next(handshakes)
        await request.reject(401, extra_headers=[(b"Content-Type", b"application/json")], body=body)

    context = server_ssl_context(pki.dir / "server.crt", pki.dir / "server.key", pki.ca)
    fake = await nursery.start(
        partial(
            serve_websocket, handler, "127.0.0.1", 0, ssl_context=context, handler_nursery=nursery
        )
    )
    tokens = source(server, pki, "alice", tmp_path / "alice.refresh")
    with trio.fail_after(FAST), pytest.raises(TokenRefused) as refused:
        async with connect_authorized(
            f"wss://127.0.0.1:{fake.port}/ws", pki.client_context("alice"), tokens
        ):
            pass
    assert refused.value.code == "token_expired"
    assert next(handshakes) == 2


async def test_in_band_renewal_rotates_the_stored_token(
    start_below_tls, autojump_clock, tmp_path: Path
) -> None:
    """A 2 s token is renewed on the same link (no reconnect), each renewal spending the
    stored refresh token and storing its successor; traffic goes through exactly once."""
    below: BelowTls = await start_below_tls(token_lifetime=2.0)
    path = tmp_path / "alice.refresh"
    tokens = below_source(below, "alice", path)
    async with connect_resilient(
        str(URL), below.pki.client_context("alice"), tokens, heartbeat=(0, 0)
    ) as alice:
        first = await alice.receive()
        assert isinstance(first, Online)
        stored = path.read_text().strip()
        await alice.subscribe("/topic/lobby")
        await alice.send("/topic/lobby", "one")
        await trio.sleep(2.5)  # past the first token's expiry
        await alice.send("/topic/lobby", "two")
        events = [await alice.receive(), await alice.receive()]
    assert path.read_text().strip() != stored
    assert [e.text for e in events if isinstance(e, Message)] == ["one", "two"]
    assert not any(isinstance(e, Reconnecting | Online) for e in events)
    assert alice.session == first.session
