"""A live connection never outlives its authorization, and one bad peer never hurts another.

Time-driven cases (expiry, renewal, connect timeout, slow consumer, picking up a rotated
key) run below TLS on the mock clock (tests/below_tls.py); revocation runs over real TLS.
"""

from __future__ import annotations

import time

import jwt
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from chat.store.keys import KeyStore
from chat.store.state import StateStore
from tests.below_tls import BelowTls
from tests.conftest import StompPeer, TestPki, raw_ws, stomp_peer, token_for


async def closed_with(peer: StompPeer, message: str, code: int, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        frame = await peer.receive(timeout)
        while frame.command != "ERROR":
            frame = await peer.receive(timeout)
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


async def test_connection_closes_when_token_expires(start_below_tls, autojump_clock) -> None:
    """Closed when the wall clock reaches `exp`: the guard sleeps until then, not in ticks."""
    below: BelowTls = await start_below_tls(token_lifetime=60)
    token = await below.token("alice")
    async with below.stomp_peer("alice", token=token) as alice:
        expires_in = _exp(token) - below.server.clock()
        start = trio.current_time()
        await closed_with(alice, "token expired", 1008, timeout=120)
        assert trio.current_time() - start == pytest.approx(expires_in)


FLOOD = 50  # messages of 8000 bytes: six times a stalled peer's 64 KiB outbound buffer


def _exp(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_in_band_renewal_extends_authorization(start_below_tls, autojump_clock) -> None:
    """Renewed half a second before the first token's `exp`, the connection outlives it.

    The guard wakes at the first token's `exp`, finds the fresh one and sleeps on; without
    the renewal it would close the connection then, before alice sends again."""
    below: BelowTls = await start_below_tls(token_lifetime=60)
    first = await below.token("alice")
    async with below.stomp_peer("alice", token=first) as alice:
        await trio.sleep(_exp(first) - 0.5 - below.server.clock())
        fresh = await below.token("alice")
        assert _exp(fresh) > _exp(first)  # issued in a later second
        await alice.send(
            "SEND", {"destination": "/session/token", "receipt": "renewed"}, fresh.encode()
        )
        assert (await alice.receive()).get("receipt-id") == "renewed"
        await trio.sleep(0.8)  # past the first token, inside the fresh one
        assert below.server.clock() > _exp(first)
        await alice.send("SEND", {"destination": "/topic/x", "receipt": "alive"})
        assert (await alice.receive()).get("receipt-id") == "alive"


async def test_renewal_with_another_identity_token_is_refused(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        bobs = await token_for(server, pki, "bob")
        await alice.send("SEND", {"destination": "/session/token"}, bobs.encode())
        frame = await alice.receive()
        assert (frame.command, frame.get("message")) == ("ERROR", "token renewal refused")
        assert b"token_cert_mismatch" in frame.body


async def test_no_connect_frame_in_time(start_below_tls, autojump_clock) -> None:
    below: BelowTls = await start_below_tls(connect_timeout=3)
    async with below.raw_ws("alice") as ws:
        start = trio.current_time()
        await closed_with(StompPeer(ws), "connect timeout", 1008)
        assert trio.current_time() - start == 3


async def test_slow_consumer_is_evicted_without_hurting_others(
    start_below_tls, autojump_clock
) -> None:
    """bob's stream is in lockstep (a write waits for his read, as a full socket buffer
    makes it wait) and bob never reads: the server drops him, not the room."""
    below: BelowTls = await start_below_tls(
        outbound_buffer_bytes=64 * 1024, max_frame_bytes=16 * 1024
    )
    async with (
        below.stomp_peer("bob", pair=trio.testing.lockstep_stream_pair) as stalled,
        below.stomp_peer("carol") as ok,
        below.stomp_peer("alice") as alice,
    ):
        for peer in (stalled, ok):
            await peer.send("SUBSCRIBE", {"destination": "/topic/flood", "id": "f", "receipt": "r"})
            assert (await peer.receive()).command == "RECEIPT"
        body = b"x" * 8000
        # bob never reads; carol keeps reading. The server must drop bob, not stall.
        async with trio.open_nursery() as nursery:
            got = []

            async def drain() -> None:
                while len(got) < FLOOD:
                    got.append(await ok.receive())

            nursery.start_soon(drain)
            for n in range(FLOOD):  # paced by receipts: a reader keeps up, the stalled one cannot
                await alice.send("SEND", {"destination": "/topic/flood", "receipt": str(n)}, body)
                assert (await alice.receive()).get("receipt-id") == str(n)
        assert len(got) == FLOOD
        with trio.fail_after(5):
            frames = []
            with pytest.raises(ConnectionClosed):
                while True:
                    frames.append(await stalled.receive())
        assert frames[-1].command == "ERROR"
        assert frames[-1].get("message") == "slow consumer"
        assert stalled.ws.closed.code == 1008


async def test_running_server_picks_up_rotated_key(start_below_tls, autojump_clock) -> None:
    """`chat-server keys rotate` from another process is seen within a few key polls."""
    below: BelowTls = await start_below_tls(revocation_poll=0.1)
    before = await below.token("alice")
    new_kid = KeyStore.open(below.config.state_dir / "keys").rotate(below.server.clock())
    await trio.sleep(0.5)
    after = await below.token("alice")
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    for token in (before, after):  # the old key keeps verifying
        async with below.raw_ws("alice", token=token) as ws:
            assert ws.subprotocol == "v12.stomp"
