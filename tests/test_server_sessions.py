"""A live connection never outlives its authorization, and one bad peer never hurts another."""

from __future__ import annotations

import time

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed

from chat.store.keys import KeyStore
from chat.store.state import StateStore
from tests.conftest import RunningServer, StompPeer, TestPki, raw_ws, stomp_peer, token_for


async def closed_with(peer: StompPeer, message: str, code: int, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        frame = await peer.receive()
        while frame.command != "ERROR":
            frame = await peer.receive()
        assert frame.get("message") == message, frame
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await peer.ws.get_message()
    assert info.value.reason.code == code


async def test_revoking_identity_from_another_process_closes_live_connection(
    start_server, pki: TestPki
) -> None:
    server = await start_server(revocation_poll=0.1)
    async with stomp_peer(server, pki, "alice") as alice, stomp_peer(server, pki, "bob") as bob:
        operator = StateStore.open(
            server.config.state_dir / "state.db"
        )  # like `chat-server revoke`
        started = trio.current_time()
        operator.revoke_sub("alice", time.time())
        operator.close()
        await closed_with(alice, "token revoked", 1008, timeout=2)
        assert trio.current_time() - started < 2
        await bob.send("SEND", {"destination": "/topic/x", "receipt": "bob-ok"})
        assert (await bob.receive()).get("receipt-id") == "bob-ok"


async def test_revoking_one_jti_closes_that_connection(start_server, pki: TestPki) -> None:
    server = await start_server(revocation_poll=0.1)
    token = await token_for(server, pki, "alice")
    async with raw_ws(server, pki, "alice", token=token) as ws:
        alice = StompPeer(ws)
        await alice.connect()
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        server.server.state.revoke_jti(jti, time.time() + 600)
        await closed_with(alice, "token revoked", 1008, timeout=2)


async def test_connection_closes_when_token_expires(start_server, pki: TestPki) -> None:
    server = await start_server(token_lifetime=1)
    async with stomp_peer(server, pki, "alice") as alice:
        await closed_with(alice, "token expired", 1008, timeout=4)


def _exp(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


async def _wall_clock_reaches(instant: float) -> None:
    """Tokens expire on the wall clock (whole seconds): wait for it, not for trio's."""
    await trio.sleep(max(0.0, instant - time.time()))


async def test_in_band_renewal_extends_authorization(start_server, pki: TestPki) -> None:
    """Renewed half a second before the first token's `exp`, the connection outlives it.

    Heart-beats every 100 ms make the server check authorization every 50 ms, so without
    the renewal the connection would be closed by the time alice sends again."""
    server = await start_server(token_lifetime=2, heartbeat=(100, 100))
    first = await token_for(server, pki, "alice")
    async with raw_ws(server, pki, "alice", token=first) as ws:
        alice = StompPeer(ws)
        await alice.connect(heartbeat="0,100")
        await _wall_clock_reaches(_exp(first) - 0.5)
        fresh = await token_for(server, pki, "alice")
        assert _exp(fresh) > _exp(first)  # issued in a later second
        await alice.send(
            "SEND", {"destination": "/session/token", "receipt": "renewed"}, fresh.encode()
        )
        assert (await alice.receive()).get("receipt-id") == "renewed"
        await _wall_clock_reaches(_exp(first) + 0.3)  # past the first token, inside the fresh
        await alice.send("SEND", {"destination": "/topic/x", "receipt": "alive"})
        assert (await alice.receive()).get("receipt-id") == "alive"


async def test_renewal_with_another_identity_token_is_refused(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        bobs = await token_for(server, pki, "bob")
        await alice.send("SEND", {"destination": "/session/token"}, bobs.encode())
        frame = await alice.receive()
        assert (frame.command, frame.get("message")) == ("ERROR", "token renewal refused")
        assert b"token_cert_mismatch" in frame.body


async def test_no_connect_frame_in_time(start_server, pki: TestPki) -> None:
    server = await start_server(connect_timeout=0.3)
    async with raw_ws(server, pki, "alice") as ws:
        await closed_with(StompPeer(ws), "connect timeout", 1008)


async def test_slow_consumer_is_evicted_without_hurting_others(start_server, pki) -> None:
    server = await start_server(outbound_buffer_bytes=64 * 1024, max_frame_bytes=16 * 1024)
    async with (
        stomp_peer(server, pki, "bob") as stalled,
        stomp_peer(server, pki, "carol") as ok,
        stomp_peer(server, pki, "alice") as alice,
    ):
        for peer in (stalled, ok):
            await peer.send("SUBSCRIBE", {"destination": "/topic/flood", "id": "f", "receipt": "r"})
            assert (await peer.receive()).command == "RECEIPT"
        body = b"x" * 8000
        # bob never reads; carol keeps reading. The server must drop bob, not stall.
        async with trio.open_nursery() as nursery:
            got = []

            async def drain() -> None:
                while len(got) < 400:
                    got.append(await ok.receive())

            nursery.start_soon(drain)
            for n in range(400):  # paced by receipts: a reader keeps up, the stalled one cannot
                await alice.send("SEND", {"destination": "/topic/flood", "receipt": str(n)}, body)
                assert (await alice.receive()).get("receipt-id") == str(n)
        assert len(got) == 400
        with trio.fail_after(5):
            frames = []
            with pytest.raises(ConnectionClosed):
                while True:
                    frames.append(await stalled.receive())
        assert frames[-1].command == "ERROR"
        assert frames[-1].get("message") == "slow consumer"
        assert stalled.ws.closed.code == 1008


async def test_running_server_picks_up_rotated_key(start_server, pki: TestPki) -> None:
    server: RunningServer = await start_server(revocation_poll=0.1)
    before = await token_for(server, pki, "alice")
    new_kid = KeyStore.open(server.config.state_dir / "keys").rotate(time.time())
    await trio.sleep(0.5)
    after = await token_for(server, pki, "alice")
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    for token in (before, after):  # the old key keeps verifying
        async with raw_ws(server, pki, "alice", token=token) as ws:
            assert ws.subprotocol == "v12.stomp"
