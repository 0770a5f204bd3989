"""What follows the TLS handshake, over memory streams on the mock clock: the request head's
deadline, HTTP refusals, the upgrade on the server's wall clock, shutdown."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from chat.client.errors import TokenRefused
from chat.server.app import MAX_REQUEST_BODY
from tests.below_tls import BelowTls, http_exchange


async def closed_at(stream: trio.abc.Stream) -> float:
    """Read until the server closes the stream; when it did."""
    while await stream.receive_some():
        pass
    return trio.current_time()


async def test_a_silent_peer_is_dropped_at_the_head_deadline(
    start_below_tls, autojump_clock
) -> None:
    below: BelowTls = await start_below_tls(handshake_timeout=10)
    start = trio.current_time()
    assert await closed_at(below.open_stream("alice")) - start == 10


async def test_a_trickled_head_gets_no_more_time(start_below_tls, autojump_clock) -> None:
    """One byte a second keeps the connection busy, not alive: the deadline is for the head."""
    below: BelowTls = await start_below_tls(handshake_timeout=10)
    stream = below.open_stream("alice")
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def trickle() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                await stream.send_all(bytes([byte]))
                await trio.sleep(1)

        nursery.start_soon(trickle)
        assert await closed_at(stream) - start == 10
        nursery.cancel_scope.cancel()


async def test_an_oversized_body_is_413(below_tls: BelowTls, autojump_clock) -> None:
    body = b"x" * (MAX_REQUEST_BODY + 1)
    reply = await below_tls.http("alice", "POST", "/auth/refresh", body=body)
    assert (reply.status, reply.json()["error"]) == (413, "body_too_large")


async def test_garbage_instead_of_http_is_400(below_tls: BelowTls, autojump_clock) -> None:
    stream = below_tls.open_stream("alice")
    await stream.send_all(b"\x16\x03\x01 not http\r\n\r\n")
    answer = b""
    while data := await stream.receive_some():
        answer += data
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_the_token_endpoint_answers_for_the_peer(below_tls: BelowTls, autojump_clock) -> None:
    reply = await http_exchange(below_tls.open_stream("bob"), "POST", "/auth/token")
    assert reply.status == 200
    claims = below_tls.server.authority.verify(
        reply.json()["access_token"], below_tls.server.clock()
    )
    assert (claims.sub, claims.x5t) == ("bob", below_tls.peer("bob").x5t)


async def test_a_token_expired_on_the_servers_clock_is_refused_at_the_upgrade(
    start_below_tls, autojump_clock
) -> None:
    below: BelowTls = await start_below_tls(token_lifetime=60, clock_leeway=5)
    token = await below.token("alice")
    await trio.sleep(64)  # inside the leeway: still accepted
    async with below.client("alice", token=token) as alice:
        assert alice.user_name == "alice"
    await trio.sleep(1)
    with pytest.raises(TokenRefused) as refused:
        async with below.client("alice", token=token):
            pass
    assert (refused.value.status, refused.value.code) == (401, "token_expired")


async def test_shutdown_closes_with_1001_within_the_grace(start_below_tls, autojump_clock) -> None:
    below: BelowTls = await start_below_tls(shutdown_grace=5)
    async with below.stomp_peer("alice") as alice:
        start = trio.current_time()
        below.server.shutdown()
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await alice.ws.get_message()
        assert trio.current_time() - start < 5
    assert info.value.reason.code == 1001
