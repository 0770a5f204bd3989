"""`--metrics` (PROTOCOL.md §12) scraped over a real socket, and the health routes.

The scrape test runs a real server on loopback: a subscriber, a publisher, a refused upgrade
and a failed TLS handshake move the counters by exactly what they did. The health tests run
below TLS on the mock clock, with the history's commit made to fail as a full disk would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
import trio
from cryptography import x509
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected, open_websocket_url

from chat.server.cli import main
from chat.server.config import parse_address
from chat.server.durability import RETRY_DELAY
from chat.store.history import Batch
from tests.below_tls import BelowTls
from tests.conftest import RunningServer, StartServer, TestPki, stomp_peer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One plain HTTP/1.1 request to the metrics listener; its status and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def samples(text: bytes) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


async def failed_tls_handshake(server: RunningServer) -> None:
    """Plain HTTP to the TLS port; returns once the server has closed the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            try:
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass


async def refused_without_token(server: RunningServer, pki: TestPki) -> None:
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(
            server.ws_url, ssl_context=pki.client_context("carol"), subprotocols=["v12.stomp"]
        ):
            pass


async def test_a_scrape_counts_what_happened(start_server: StartServer, pki: TestPki) -> None:
    server = await start_server(metrics=("127.0.0.1", 0))
    port = server.server.metrics_listeners[0].socket.getsockname()[1]
    async with stomp_peer(server, pki, "bob") as bob, stomp_peer(server, pki, "alice") as alice:
        await bob.send("SUBSCRIBE", {"destination": "/topic/m", "id": "s", "receipt": "r"})
        assert (await bob.receive()).command == "RECEIPT"
        await alice.send("SEND", {"destination": "/topic/m"}, b"hello")
        assert (await bob.receive()).body == b"hello"
        await refused_without_token(server, pki)
        await failed_tls_handshake(server)
        status, body = await get(port, "/metrics")
    assert status == 200
    got = samples(body)
    cert = x509.load_pem_x509_certificate(server.config.cert_path().read_bytes())
    expected = {
        ("chat_connections", ()): 2,
        ("chat_handshakes_total", (("result", "ok"),)): 2,
        ("chat_handshakes_total", (("result", "missing_token"),)): 1,
        ("chat_handshakes_total", (("result", "tls_failed"),)): 1,
        ("chat_messages_published_total", ()): 1,
        ("chat_messages_delivered_total", ()): 1,
        ("chat_slow_consumer_evictions_total", ()): 0,
        ("chat_delivery_latency_seconds_count", ()): 1,
        (
            "chat_certificate_expiry_timestamp_seconds",
            (("cert", "server"),),
        ): cert.not_valid_after_utc.timestamp(),
    }
    assert {key: got.get(key) for key in expected} == expected
    assert ("chat_certificate_expiry_timestamp_seconds", (("cert", "ca"),)) in got
    assert ("process_cpu_seconds_total", ()) in got  # prometheus_client's process metrics
    assert (await get(port, "/"))[0] == 404
    assert (await get(port, "/metrics", "POST"))[0] == 404


async def test_no_metrics_listener_by_default(start_server: StartServer) -> None:
    server = await start_server()
    assert server.server.metrics is None and server.server.metrics_listeners == []


async def test_a_slow_consumer_eviction_is_counted(
    start_below_tls: Callable[..., BelowTls], autojump_clock: trio.testing.MockClock
) -> None:
    """bob's stream is in lockstep and he never reads: his outbox overflows (as in
    test_server_sessions.py), and the registry counts one eviction once he is gone."""
    below: BelowTls = await start_below_tls(
        outbound_buffer_bytes=64 * 1024, max_frame_bytes=16 * 1024, metrics=("127.0.0.1", 0)
    )
    assert below.server.metrics is not None
    async with (
        below.stomp_peer("bob", pair=trio.testing.lockstep_stream_pair) as stalled,
        below.stomp_peer("alice") as alice,
    ):
        await stalled.send("SUBSCRIBE", {"destination": "/topic/f", "id": "f", "receipt": "r"})
        assert (await stalled.receive()).command == "RECEIPT"
        for n in range(20):  # 160 kB for a 64 KiB buffer
            await alice.send("SEND", {"destination": "/topic/f", "receipt": str(n)}, b"x" * 8000)
            assert (await alice.receive()).get("receipt-id") == str(n)
        with trio.fail_after(5):
            while len(below.server.connections) > 1:
                await trio.sleep(0.01)
        got = samples(generate_latest(below.server.metrics.registry))
    assert got[("chat_slow_consumer_evictions_total", ())] == 1
    assert got[("chat_connections", ())] == 1


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("9100", "expected HOST:PORT, e.g. 127.0.0.1:9100, not '9100'"),
        (":9100", "expected HOST:PORT, e.g. 127.0.0.1:9100, not ':9100'"),
        ("localhost:http", "expected HOST:PORT, e.g. 127.0.0.1:9100, not 'localhost:http'"),
        ("127.0.0.1:70000", "port must be 0 to 65535, not 70000"),
    ],
)
def test_a_bad_metrics_address_is_one_line(
    value: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="^" + error.replace(".", r"\.") + "$"):
        parse_address(value)
    assert main(["--metrics", value]) == 2  # in-process: the same path as the command's
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"chat-server: argument --metrics: {error} (see 'chat-server --help')"]


def test_metrics_addresses() -> None:
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)


async def test_healthz_is_503_while_history_commits_fail(
    start_below_tls: Callable[..., BelowTls],
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    below: BelowTls = await start_below_tls()
    assert (await below.http("alice", "GET", "/healthz")).body == b"ok"

    def full_disk(batch: Batch) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(below.server.history, "commit", full_disk)
        async with below.stomp_peer("alice") as alice:
            await alice.send("SEND", {"destination": "/topic/m"}, b"waits for the disk")
            await trio.sleep(RETRY_DELAY / 2)  # the mock clock: the first commit has failed
            reply = await below.http("bob", "GET", "/healthz")
            assert reply.status == 503
            assert reply.json()["status"] == "unavailable"
            assert reply.json()["checks"]["state"] == "ok"
            assert "database or disk is full" in reply.json()["checks"]["history"]
    await trio.sleep(RETRY_DELAY)  # the committer's next try succeeds
    assert (await below.http("bob", "GET", "/healthz")).status == 200


async def test_healthz_is_503_when_the_state_store_fails(
    start_below_tls: Callable[..., BelowTls], autojump_clock: trio.testing.MockClock
) -> None:
    below: BelowTls = await start_below_tls()
    other = sqlite3.connect(below.config.state_dir / "state.db", isolation_level=None)
    try:
        other.executescript("DROP TABLE counters;")
    finally:
        other.close()
    reply = await below.http("bob", "GET", "/healthz")
    assert reply.status == 503
    assert reply.json()["checks"]["history"] == "ok"
    assert reply.json()["checks"]["state"].startswith("failing: ")


async def test_readyz_details_for_people(
    start_below_tls: Callable[..., BelowTls], autojump_clock: trio.testing.MockClock
) -> None:
    below: BelowTls = await start_below_tls()
    await trio.sleep(5)
    async with below.stomp_peer("alice"):
        reply = await below.http("bob", "GET", "/readyz")
    assert reply.status == 200
    detail = reply.json()
    uptime = detail.pop("uptime_s")
    assert 5 <= uptime < 6
    assert detail == {"status": "ok", "checks": {"history": "ok", "state": "ok"}, "connections": 1}
