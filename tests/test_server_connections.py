"""PROTOCOL.md §12, first point, at the connection level: unfinished handshakes and
connections are bounded (the oldest unfinished handshake is shed for a newcomer), an
identity holds a bounded number of WebSocket connections (429 too_many_connections), a
request head is limited to exactly MAX_REQUEST_HEAD bytes (431), refused TLS handshakes
are logged with address and reason at a bounded rate, and the soft file limit is raised.
"""

from __future__ import annotations

import json
import logging
import resource
import ssl
from collections.abc import Callable

import pytest
import trio
import trio.testing

from chat.server.admission import (
    FILE_RESERVE,
    MIN_CONNECTIONS,
    Admission,
    Arrival,
    FileLimit,
    connections_within,
)
from chat.server.app import (
    IDLE_SPREAD,
    IDLE_TIMEOUT,
    MAX_REQUEST_HEAD,
    REFUSAL_LINES,
    REFUSAL_WINDOW,
)
from chat.server.config import ConfigError
from chat.server.refusals import LogRate, refusal_reason
from tests.below_tls import BelowTls
from tests.conftest import (
    HttpReply,
    RunningServer,
    StompPeer,
    TestPki,
    http_request,
    raw_ws,
    token_for,
)

# ---------------------------------------------------------------- the pure parts


def test_admission_sheds_the_oldest_handshake_in_progress() -> None:
    admission: Admission[str] = Admission(max_connections=10, max_handshakes=2)
    for handle in "abcde":
        assert admission.arrive(handle).shed == ()
    assert admission.started("a") == ()
    assert admission.started("b") == ()
    admission.opened("a")  # established: never shed
    assert admission.started("c") == ()
    assert admission.started("d") == ("b",)
    assert admission.started("b") == ()  # shed already: nothing more to do
    assert (admission.connections, admission.unfinished, admission.handshakes) == (4, 3, 2)
    admission.left("c")
    assert admission.started("e") == ()


def test_admission_sheds_idle_sockets_first_and_refuses_only_when_all_are_established() -> None:
    admission: Admission[str] = Admission(max_connections=3, max_handshakes=2)
    admission.arrive("a")
    admission.opened("a")
    admission.arrive("b")  # idle
    admission.arrive("c")
    admission.started("c")
    assert admission.arrive("d") == Arrival(admitted=True, shed=("b",))  # idle first
    admission.started("d")
    assert admission.arrive("e") == Arrival(admitted=True, shed=("c",))  # then the oldest
    admission.opened("d")
    admission.opened("e")
    assert admission.arrive("f") == Arrival(admitted=False)  # every one is established
    admission.left("a")
    assert admission.arrive("f").admitted
    assert admission.connections == 3
    assert (admission.shed_total, admission.refused_total) == (2, 1)  # for the summary line


def test_connections_fit_the_file_limit() -> None:
    assert connections_within(20_000, 10_000) == 10_000
    assert connections_within(1024, 10_000) == 1024 - FILE_RESERVE
    with pytest.raises(ConfigError, match="file limit"):
        connections_within(FILE_RESERVE + MIN_CONNECTIONS - 1, 10_000)


def test_a_file_limit_too_low_for_max_connections_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chat.server")
    FileLimit(1024, 1024, 1024 - FILE_RESERVE).report(10_000)
    assert caplog.messages == [
        "file limit: 1024 open files",
        f"--max-connections 10000 does not fit the file limit of 1024 open files: serving "
        f"at most {1024 - FILE_RESERVE} connections (raise the limit with ulimit -n)",
    ]


def verify_failure(code: int, message: str) -> trio.BrokenResourceError:
    """What trio raises when OpenSSL refused the client's certificate."""
    cause = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    cause.verify_code, cause.verify_message = code, message
    error = trio.BrokenResourceError()
    error.__cause__ = cause
    return error


def ssl_failure(reason: str) -> trio.BrokenResourceError:
    cause = ssl.SSLError(1, reason)
    cause.reason = reason
    error = trio.BrokenResourceError()
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ssl_failure("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "no certificate"),
        (verify_failure(20, "unable to get local issuer certificate"), "unknown CA"),
        (verify_failure(10, "certificate has expired"), "certificate expired"),
        (verify_failure(23, "certificate revoked"), "certificate revoked"),
        (verify_failure(50, "something else"), "something else"),
        (ssl_failure("WRONG_VERSION_NUMBER"), "not TLS"),
        (trio.BrokenResourceError(), None),  # the peer went away: not a refusal
    ],
)
def test_refusal_reasons(error: BaseException, reason: str | None) -> None:
    assert refusal_reason(error) == reason


def test_log_rate_holds_back_lines_beyond_its_limit_per_window() -> None:
    rate = LogRate(limit=2, window=1.0)
    assert [rate.allow(10.0), rate.allow(10.5), rate.allow(10.9), rate.allow(10.99)] == [
        True,
        True,
        False,
        False,
    ]
    assert rate.held_back() == 2
    assert rate.held_back() == 0  # each is summarized once
    assert rate.allow(11.0)  # a new window
    assert rate.allow(11.1)
    assert not rate.allow(11.2)
    assert rate.held_back() == 1


# ---------------------------------------------------------------- helpers


async def silent_socket(server: RunningServer) -> trio.SocketStream:
    """A TCP connection that never starts TLS."""
    return await trio.open_tcp_stream("127.0.0.1", server.port)


async def stalled_handshake(server: RunningServer) -> trio.SocketStream:
    """A TLS handshake begun (the first bytes of a record) and never finished."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"\x16\x03\x01")
    return stream


async def until(condition: Callable[[], bool]) -> None:
    """Until the server (in this test's event loop) has caught up with what the test did;
    the deadline is a guard against a hang, not a measurement."""
    with trio.fail_after(5):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()


async def is_closed(stream: trio.abc.Stream) -> bool:
    """Whether the server closed `stream` (a guard, not a timing: it answers at once)."""
    with trio.fail_after(5):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


def upgrade_headers(token: str) -> list[tuple[str, str]]:
    return [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", f"v12.stomp, bearer.{token}"),
    ]


async def upgrade(server: RunningServer, pki: TestPki, name: str, token: str) -> HttpReply:
    """An upgrade request whose answer the test reads as plain HTTP."""
    context = pki.client_context(name)
    return await http_request(server, context, "GET", "/ws", upgrade_headers(token))


# ---------------------------------------------------------------- handshakes and connections


async def test_a_healthy_client_connects_past_stalled_handshakes(
    start_server, pki: TestPki
) -> None:
    server: RunningServer = await start_server(max_handshakes=4)
    admission = server.server.admission
    token = await token_for(server, pki, "alice")
    stalled = []
    for held in range(1, 5):
        stalled.append(await stalled_handshake(server))
        await until(lambda held=held: admission.handshakes == held)
    async with raw_ws(server, pki, "alice", token=token) as ws:
        await StompPeer(ws).connect()
        assert await is_closed(stalled[0])  # the oldest was shed for the newcomer
        assert admission.handshakes == 3  # the other three are still held
    for stream in stalled:
        await stream.aclose()


async def test_idle_sockets_are_held_up_to_max_connections(start_server, pki: TestPki) -> None:
    """Sockets that sent nothing cost no TLS state: max_handshakes does not shed them (a
    persistent attacker would only open them again, ahead of healthy clients)."""
    server: RunningServer = await start_server(max_handshakes=4)
    token = await token_for(server, pki, "alice")
    silent = [await silent_socket(server) for _ in range(6)]
    async with raw_ws(server, pki, "alice", token=token) as ws:
        await StompPeer(ws).connect()
        assert server.server.admission.unfinished == 6
    for stream in silent:
        await stream.aclose()


async def test_an_idle_socket_is_held_until_the_idle_timeout(start_server, mock_clock) -> None:
    """The mock clock stands still unless jumped."""
    server: RunningServer = await start_server(handshake_timeout=10)
    silent = await silent_socket(server)
    await until(lambda: server.server.admission.unfinished == 1)
    mock_clock.jump(IDLE_TIMEOUT * (1 - IDLE_SPREAD) - 1)  # well past the handshake timeout
    await trio.testing.wait_all_tasks_blocked()
    assert server.server.admission.unfinished == 1
    mock_clock.jump(IDLE_TIMEOUT * IDLE_SPREAD + 1)
    assert await is_closed(silent)


async def test_beyond_max_connections_new_sockets_are_closed_at_once(
    start_server, pki: TestPki
) -> None:
    server: RunningServer = await start_server(max_connections=3)
    tokens = {name: await token_for(server, pki, name) for name in ("alice", "bob", "carol")}
    async with raw_ws(server, pki, "alice", token=tokens["alice"]) as alice:
        await StompPeer(alice).connect()
        async with raw_ws(server, pki, "bob", token=tokens["bob"]) as bob:
            await StompPeer(bob).connect()
            silent = await silent_socket(server)
            # the third slot is an unfinished handshake: shed for a healthy client
            async with raw_ws(server, pki, "carol", token=tokens["carol"]) as carol:
                await StompPeer(carol).connect()
                assert await is_closed(silent)
                # every slot is an established connection: a newcomer is closed at once
                assert await is_closed(await silent_socket(server))
                assert server.server.admission.connections == 3


# ---------------------------------------------------------------- per identity


async def test_an_identity_holds_at_most_its_connections(
    start_server, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat.server")
    server: RunningServer = await start_server(max_connections_per_identity=2)
    alice, bob = await token_for(server, pki, "alice"), await token_for(server, pki, "bob")
    async with raw_ws(server, pki, "alice", token=alice) as first:
        await StompPeer(first).connect()
        async with raw_ws(server, pki, "alice", token=alice) as second:
            await StompPeer(second).connect()
            reply = await upgrade(server, pki, "alice", alice)
            assert (reply.status, reply.json()["error"]) == (429, "too_many_connections")
            assert reply.json()["detail"]
            async with raw_ws(server, pki, "bob", token=bob) as other:
                await StompPeer(other).connect()  # another identity is not affected
        # the second one closed: its slot is free again
        async with raw_ws(server, pki, "alice", token=alice) as third:
            await StompPeer(third).connect()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "refused upgrade from alice: too_many_connections" in lines


# ---------------------------------------------------------------- the request head


def head_of(size: int) -> bytes:
    """A GET /healthz whose head (request line to the blank line) is exactly `size` bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


async def answer(below: BelowTls, data: bytes) -> tuple[int, dict[str, str] | None]:
    """Send `data` in one write; the status and the JSON body of the answer, if any."""
    stream = below.open_stream("alice")
    await stream.send_all(data)
    reply = bytearray()
    while chunk := await stream.receive_some():
        reply += chunk
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body.startswith(b"{") else None


@pytest.mark.parametrize("size", [MAX_REQUEST_HEAD - 1, MAX_REQUEST_HEAD])
async def test_a_head_up_to_the_limit_is_served(start_below_tls, autojump_clock, size) -> None:
    below: BelowTls = await start_below_tls()
    assert await answer(below, head_of(size)) == (200, None)


@pytest.mark.parametrize("size", [MAX_REQUEST_HEAD + 1, 3 * MAX_REQUEST_HEAD])
async def test_a_head_over_the_limit_is_431(start_below_tls, autojump_clock, size) -> None:
    """Over the limit by one byte, or arriving whole in one read: refused at the limit."""
    below: BelowTls = await start_below_tls()
    status, body = await answer(below, head_of(size))
    assert (status, body and body["error"]) == (431, "request_head_too_large")


async def test_an_unfinished_head_over_the_limit_is_431(start_below_tls, autojump_clock) -> None:
    below: BelowTls = await start_below_tls()
    status, body = await answer(below, head_of(3 * MAX_REQUEST_HEAD)[: MAX_REQUEST_HEAD + 1])
    assert (status, body and body["error"]) == (431, "request_head_too_large")


# ---------------------------------------------------------------- refused TLS handshakes


def no_certificate_context(pki: TestPki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.check_hostname = False
    return context


async def refused_handshake(server: RunningServer, context: ssl.SSLContext) -> None:
    """A handshake the server refuses; returns once the server has closed the connection."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=context)
    with trio.fail_after(5):
        try:
            await stream.do_handshake()  # TLS 1.3: the client finishes before the server checks
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
    await trio.aclose_forcefully(stream)


async def test_refused_handshakes_are_logged_with_address_and_reason_at_a_bounded_rate(
    start_server, pki: TestPki, caplog: pytest.LogCaptureFixture, mock_clock
) -> None:
    """The mock clock stands still unless jumped: every refusal falls in one window."""
    caplog.set_level(logging.INFO, logger="chat.server")
    server: RunningServer = await start_server()
    contexts = [no_certificate_context(pki), pki.foreign_context()]
    for attempt in range(REFUSAL_LINES + 3):
        await refused_handshake(server, contexts[attempt % 2])
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    refused = [line for line in lines if line.startswith("refused 127.0.0.1:")]
    assert len(refused) == REFUSAL_LINES
    assert refused[0].endswith(": no certificate")
    assert refused[1].endswith(": unknown CA")
    mock_clock.jump(REFUSAL_WINDOW)
    await trio.testing.wait_all_tasks_blocked()
    summary = f"3 more refused handshakes in the last {REFUSAL_WINDOW:g} s"
    assert summary in [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------- the file limit


async def test_the_soft_file_limit_is_raised_to_the_hard_one(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat.server")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(hard, 1024)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    await start_server()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    if lowered != hard:
        assert f"file limit: {hard} open files (raised from {lowered})" in caplog.messages
