"""chat-load against real servers on loopback: the counts add up, the report has its shape."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from array import array
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import trio

from chat import pki as pki_module
from chat.load import cli
from chat.load.runner import LoadConfig, LoadError, run_load
from chat.load.stats import (
    BODY_HEAD,
    Flow,
    Latency,
    ProcessGone,
    Tally,
    Window,
    make_body,
    process_cpu_seconds,
)
from tests.conftest import RunningServer, StartServer, TestPki

ROOT = Path(__file__).resolve().parent.parent


def _config(server_url: str, pki: TestPki, **overrides: object) -> LoadConfig:
    base = LoadConfig(
        url=server_url, certs=pki.dir, ca=pki.ca, subscribers=5, publishers=1, topics=1,
        rate=200.0, max_inflight=16, size=64, duration=0.8, warmup=0.2, server_pid=None,
    )
    return replace(base, **overrides)


def _baseline_module() -> ModuleType:
    """benchmarks/ is not a package: load the baseline server from its file."""
    spec = importlib.util.spec_from_file_location(
        "baseline_server", ROOT / "benchmarks" / "baseline_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- whole runs


async def test_every_message_reaches_every_subscriber(server: RunningServer, pki: TestPki) -> None:
    report = await run_load(_config(server.ws_url, pki, server_pid=os.getpid()))
    assert report.connections.connected == 6
    assert report.connections.failed == report.connections.dropped == 0
    assert report.sent > 0
    assert report.expected == 5 * report.sent
    assert report.delivered == report.expected and report.lost == 0
    assert report.latency.samples == report.delivered
    assert 0 < report.latency.p50_ms <= report.latency.p99_ms <= report.latency.max_ms
    assert report.deliveries_per_s > 0
    assert report.server_cpu is not None and report.server_cpu.us_per_delivery > 0
    assert report.stalls == 0


async def test_topics_split_subscribers_and_publishers(
    server: RunningServer, pki: TestPki
) -> None:
    # 6 subscribers over 3 topics: 2 each; 3 publishers, one per topic
    config = _config(server.ws_url, pki, subscribers=6, publishers=3, topics=3, rate=0.0)
    report = await run_load(config)
    assert report.connections.connected == 9
    assert report.expected == 2 * report.sent
    assert report.delivered == report.expected


async def test_tokens_are_renewed_for_runs_longer_than_their_lifetime(
    start_server: StartServer, pki: TestPki
) -> None:
    server = await start_server(token_lifetime=2.0)
    report = await run_load(_config(server.ws_url, pki, subscribers=3, duration=2.6))
    assert report.connections.dropped == 0, report.connections.first_error
    assert report.delivered == report.expected == 3 * report.sent > 0


async def test_stalled_subscribers_are_evicted_and_others_lose_nothing(
    start_server: StartServer, pki: TestPki
) -> None:
    server = await start_server(outbound_buffer_bytes=512 * 1024)
    # healthy subscribers may owe at most 4 x 60 kB: well under the 512 kB limit
    config = _config(server.ws_url, pki, subscribers=3, stalled=2, size=60000, rate=0.0,
                     max_inflight=4, duration=1.5)
    report = await run_load(config)
    assert (report.stalled, report.evicted) == (2, 2)
    assert report.connections.dropped == 0, report.connections.first_error
    assert report.delivered == report.expected == 3 * report.sent > 0


async def test_raw_mode_against_the_baseline_server(nursery: trio.Nursery, pki: TestPki) -> None:
    baseline = _baseline_module()
    context = pki_module.server_ssl_context(pki.dir / "server.crt", pki.dir / "server.key", pki.ca)
    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1")
    port = listeners[0].transport_listener.socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, partial(baseline.handle, baseline.Hub()), listeners)
    config = _config(f"wss://127.0.0.1:{port}/", pki, subscribers=4, raw=True)
    report = await run_load(config)
    assert report.mode == "raw"
    assert report.expected == 4 * report.sent > 0
    assert report.delivered == report.expected


async def test_unreachable_server_is_a_load_error(pki: TestPki) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LoadError, match="cannot get an access token"):
        await run_load(_config(f"wss://127.0.0.1:{port}/ws", pki))


async def test_cli_json_is_one_object(server: RunningServer, pki: TestPki) -> None:
    command = [
        sys.executable, "-m", "chat.load.cli", "--url", server.ws_url, "--certs", str(pki.dir),
        "--subscribers", "3", "--rate", "100", "--duration", "0.5", "--warmup", "0.1",
        "--server-pid", str(os.getpid()), "--json",
    ]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, cwd=ROOT)
    report = json.loads(done.stdout)
    assert set(report) >= {"connections", "sent", "expected", "delivered", "lost",
                           "deliveries_per_s", "latency", "server_cpu", "harness_cpu"}
    assert report["delivered"] == report["expected"] == 3 * report["sent"]
    assert set(report["latency"]) == {"samples", "p50_ms", "p99_ms", "p99_9_ms", "max_ms"}
    assert report["server_cpu"]["us_per_delivery"] > 0
    assert report["harness_cpu"]["seconds"] > 0


# ---------------------------------------------------------------- usage errors: one line, exit 2


@pytest.mark.parametrize("argv, fragment", [
    (["--raw", "--publishers", "2"], "--raw needs"),
    (["--topics", "5", "--subscribers", "4"], "--topics must be"),
    (["--size", str(BODY_HEAD - 1)], "--size must be"),
    (["--duration", "0"], "--duration must be"),
    (["--server-pid", "999999999"], "--server-pid"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_options_exit_2_with_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("chat-load: ") and fragment in err and err.count("\n") == 1


def test_no_certificates_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--certs", str(tmp_path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "no client certificates" in err and err.count("\n") == 1


# ---------------------------------------------------------------- pieces


def test_body_carries_time_and_publisher() -> None:
    body = make_body(64, 7, 123_456_789)
    assert len(body) == 64
    assert int(body[:19]) == 123_456_789 and int(body[19:BODY_HEAD]) == 7


def test_latency_percentiles_are_nearest_rank() -> None:
    samples = array("q", (ms * 1_000_000 for ms in range(1000, 0, -1)))  # 1..1000 ms
    latency = Latency.of(samples)
    assert (latency.p50_ms, latency.p99_ms, latency.p99_9_ms, latency.max_ms) == (
        500.0, 990.0, 999.0, 1000.0)
    assert Latency.of(array("q")).p50_ms is None


def test_tally_counts_measured_deliveries_and_ignores_foreign_bodies() -> None:
    window, flow = Window(), Flow(10)
    tally = Tally(window, [flow])
    window.place(100, 200)
    tally.on_sent(150, 2)
    flow.owed += 2
    tally.on_delivery(make_body(32, 0, 150), 170)
    tally.on_delivery(make_body(32, 0, 150), 250)  # sent inside, received after the window
    tally.on_delivery(make_body(32, 0, 50), 120)  # warm-up message received inside
    tally.on_delivery(b"hello from someone else", 130)
    assert (tally.sent, tally.expected, tally.delivered) == (1, 2, 2)
    assert tally.received_in_window == 2 and tally.foreign == 1
    assert list(tally.latencies) == [20, 100]
    assert flow.owed == -1


def test_window_is_half_open() -> None:
    window = Window()
    assert 0 not in window  # nothing is measured before it is placed
    window.place(10, 20)
    assert 10 in window and 19 in window and 20 not in window


def test_process_cpu_seconds() -> None:
    assert process_cpu_seconds(os.getpid()) > 0
    with pytest.raises(ProcessGone):
        process_cpu_seconds(999_999_999)
