"""chat-load against real servers on loopback: the counts add up, the report has its shape."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
from array import array
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from chat import pki as pki_module
from chat.cli_common import EXIT_ERROR
from chat.client.connection import MIN_RENEW_DELAY, RENEW_AT, TOKEN_CLOCK_GRAIN
from chat.client.http import TokenGrant
from chat.load import cli
from chat.load.identities import IdentityFiles, Lease, find_identities, load_contexts
from chat.load.progress import ERASE_LINE, ProgressLine, Sample, render
from chat.load.runner import LoadConfig, LoadError, run_load
from chat.load.stats import (
    BODY_HEAD,
    Flow,
    Latency,
    Positions,
    ProcessGone,
    SubscriberCount,
    SubscriberReport,
    Tally,
    Window,
    make_body,
    process_cpu_seconds,
)
from tests.conftest import RunningServer, StartServer, TestPki
from tests.test_server_cli import start as start_server_process

ROOT = Path(__file__).resolve().parent.parent


def _config(server_url: str, pki: TestPki, **overrides: object) -> LoadConfig:
    base = LoadConfig(
        url=server_url,
        certs=pki.dir,
        ca=pki.ca,
        subscribers=5,
        publishers=1,
        topics=1,
        rate=200.0,
        max_inflight=16,
        size=64,
        duration=0.8,
        warmup=0.2,
        server_pid=None,
    )
    return replace(base, **overrides)


class PhaseWatch:
    """A progress sink that tells when the run reaches a phase (the terminal line's feed)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.reached = trio.Event()

    def show(self, sample: Sample) -> None:
        if sample.phase == self.phase:
            self.reached.set()

    def clear(self) -> None:
        pass


def _baseline_module() -> ModuleType:
    """benchmarks/ is not a package: load the baseline server from its file."""
    spec = importlib.util.spec_from_file_location(
        "baseline_server", ROOT / "benchmarks" / "baseline_server.py"
    )
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


async def test_topics_split_subscribers_and_publishers(server: RunningServer, pki: TestPki) -> None:
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
    # a link closed for an expired token would come back by itself: no reconnect at all
    assert report.connections.reconnects == 0, report.connections.first_error
    assert report.connections.dropped == 0, report.connections.first_error
    assert report.delivered == report.expected == 3 * report.sent > 0


async def test_a_run_across_a_server_restart_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """SIGTERM the server in the measured window and start it again on the same port and
    state: subscribers resume by offset, publishers reconnect, and every message the server
    confirmed reaches every subscriber once."""
    server, port, _ = await start_server_process(tmp_path, "--log-level", "warning")
    certs = tmp_path / "certs"
    config = LoadConfig(
        url=f"wss://127.0.0.1:{port}/ws",
        certs=certs,
        ca=certs / "ca.crt",
        subscribers=4,
        publishers=1,
        topics=1,
        rate=100.0,
        max_inflight=64,
        size=64,
        duration=3.0,
        warmup=0.5,
        server_pid=None,
    )
    measuring = PhaseWatch("measuring")
    restarted = trio.Event()

    async def restart() -> None:
        nonlocal server
        await measuring.reached.wait()
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await server.wait() == 0
        server, _, _ = await start_server_process(
            tmp_path, "--log-level", "warning", "--port", str(port)
        )
        restarted.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart)
            report = await run_load(config, progress=measuring)
    finally:
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await server.wait()
    assert restarted.is_set()
    assert report.connections.dropped == report.connections.failed == 0
    assert report.confirmed > 0 and report.sent == report.confirmed + report.unconfirmed
    assert report.lost == 0 and report.delivered == report.expected == 4 * report.confirmed
    assert report.duplicates == 0
    assert all(s.reconnects >= 1 for s in report.per_subscriber), report.per_subscriber
    assert all(s.received == s.expected == report.confirmed for s in report.per_subscriber)
    assert report.connections.reconnects >= 5  # the publisher came back too
    table = cli.as_table(report)
    assert "0 lost" in table and "duplicates    0" in table


async def test_stalled_subscribers_are_evicted_and_others_lose_nothing(
    start_server: StartServer, pki: TestPki
) -> None:
    server = await start_server(outbound_buffer_bytes=512 * 1024)
    # healthy subscribers may owe at most 4 x 60 kB: well under the 512 kB limit
    config = _config(
        server.ws_url,
        pki,
        subscribers=3,
        stalled=2,
        size=60000,
        rate=0.0,
        max_inflight=4,
        duration=1.5,
    )
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


async def test_identities_option_takes_only_those_named(
    server: RunningServer, pki: TestPki
) -> None:
    report = await run_load(
        _config(server.ws_url, pki, subscribers=2, duration=0.3, identities=("carol",))
    )
    assert report.identities == ("carol",)
    assert report.delivered == report.expected == 2 * report.sent > 0


def load_command(server: RunningServer, pki: TestPki, *options: str) -> list[str]:
    """`chat-load --json` as a subprocess against `server`, with a 0.1 s warm-up."""
    base = ["--url", server.ws_url, "--certs", str(pki.dir), "--warmup", "0.1", "--json"]
    return [sys.executable, "-m", "chat.load.cli", *base, *options]


async def test_cli_json_is_one_object(server: RunningServer, pki: TestPki) -> None:
    command = load_command(server, pki, "--subscribers", "3", "--rate", "100", "--duration", "0.5")
    command += ["--server-pid", str(os.getpid())]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, cwd=ROOT)
    report = json.loads(done.stdout)
    assert set(report) >= {
        "connections",
        "sent",
        "expected",
        "delivered",
        "lost",
        "deliveries_per_s",
        "latency",
        "server_cpu",
        "harness_cpu",
    }
    assert report["delivered"] == report["expected"] == 3 * report["sent"]
    assert set(report["latency"]) == {"samples", "p50_ms", "p99_ms", "p99_9_ms", "max_ms"}
    assert report["server_cpu"]["us_per_delivery"] > 0
    assert report["harness_cpu"]["seconds"] > 0
    assert done.stderr == b""  # stderr is not a terminal: no progress line, not even cleared


async def test_progress_line_on_a_terminal_is_cleared_before_the_report(
    server: RunningServer, pki: TestPki
) -> None:
    command = load_command(server, pki, "--subscribers", "2", "--rate", "50", "--duration", "1.2")
    leader, follower = pty.openpty()
    try:
        done = await trio.run_process(
            command, stdin=subprocess.DEVNULL, stderr=follower, capture_stdout=True, cwd=ROOT
        )
        os.close(follower)
        shown = await trio.to_thread.run_sync(_read_all, leader)
    finally:
        os.close(leader)
    lines = shown.split(ERASE_LINE)
    assert lines[0] == "" and lines[-1] == ""  # every write erases first; the last one clears
    assert all(line.startswith("chat-load: ") and "\n" not in line for line in lines[1:-1])
    assert any("connected 3/3" in line and "delivered" in line for line in lines)
    assert json.loads(done.stdout)["delivered"] > 0  # stdout: the report only


def _read_all(fd: int) -> str:
    """What a pty's other side wrote, once that side is closed."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: nobody has the other side open any more
            break
        if not chunk:
            break
        data += chunk
    return data.decode()


# ---------------------------------------------------------------- usage errors: one line, exit 2


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--raw", "--publishers", "2"], "--raw needs"),
        (["--topics", "5", "--subscribers", "4"], "--topics must be"),
        (["--size", str(BODY_HEAD - 1)], "--size must be"),
        (["--duration", "0"], "--duration must be"),
        (["--server-pid", "999999999"], "--server-pid"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("chat-load: ") and fragment in err and err.count("\n") == 1


def test_no_certificates_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--certs", str(tmp_path)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "no client certificates" in err and err.count("\n") == 1


def test_unknown_identities_exit_2_naming_them(
    pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--certs", str(pki.dir), "--identities", "alice,zed,ca,ghost", "--url", NOWHERE]
    assert cli.main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("chat-load: --identities: no zed, ca, ghost in ") and "alice" not in err
    assert err.count("\n") == 1


def test_unusable_certificates_are_skipped_with_one_warning_each(
    messy_certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # nobody listens at NOWHERE: the run ends at its first token request, after the warnings
    assert cli.main(["--certs", str(messy_certs), "--url", NOWHERE]) == EXIT_ERROR
    lines = capsys.readouterr().err.splitlines()
    warnings = [line for line in lines if line.startswith("chat-load: warning: skipping ")]
    assert len(warnings) == 4 and len(lines) == 5, lines
    reasons = {line.split()[4].rstrip(":"): line for line in warnings}
    assert f"{messy_certs / 'locked.key'} is an encrypted private key" in reasons["locked"]
    assert f"{messy_certs / 'old.crt'} expired on" in reasons["old"]
    assert f"{messy_certs / 'early.crt'} is not valid before" in reasons["early"]
    assert f"{messy_certs / 'mallory.crt'} was not issued by the CA" in reasons["mallory"]
    assert "cannot get an access token" in lines[-1]


def test_a_named_identity_that_cannot_work_is_an_error(
    messy_certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--certs", str(messy_certs), "--identities", "alice,old", "--url", NOWHERE]
    assert cli.main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("chat-load: identity old: ") and "expired" in err
    assert err.count("\n") == 1


def test_load_contexts_keeps_the_usable_and_says_why_of_the_rest(messy_certs: Path) -> None:
    files = find_identities(messy_certs)
    assert [f.name for f in files] == ["alice", "early", "locked", "mallory", "old"]
    usable, skipped = load_contexts(files, messy_certs / "ca.crt", messy_certs / "ca.crt")
    assert [name for name, _ in usable] == ["alice"]
    assert [s.name for s in skipped] == ["early", "locked", "mallory", "old"]
    missing = IdentityFiles("alice", messy_certs / "alice.crt", messy_certs / "nope.key")
    _, [skip] = load_contexts([missing], messy_certs / "ca.crt", messy_certs / "ca.crt")
    assert "nope.key" in skip.reason


NOWHERE = "wss://127.0.0.1:9/ws"  # the discard port: nothing listens on loopback


@pytest.fixture
def messy_certs(tmp_path: Path, pki: TestPki) -> Path:
    """A certificates directory with one good identity and four that cannot work."""
    directory = tmp_path / "certs"
    directory.mkdir()
    for name in ("ca.crt", "alice.crt", "alice.key"):
        shutil.copy(pki.dir / name, directory / name)
    for name in ("mallory.crt", "mallory.key"):  # issued by another CA
        shutil.copy(pki.foreign_dir / name, directory / name)
    ca_key = pki_module.load_private_key(pki.dir / "ca.key")
    ca_cert = pki_module.load_certificate(pki.ca)
    key, cert = pki_module.make_client_cert(ca_key, ca_cert, "locked")
    pki_module.write_private_key(directory / "locked.key", key, b"secret")
    pki_module.write_certificate(directory / "locked.crt", cert)
    now = datetime.now(UTC)
    _client_cert(directory, "old", ca_key, ca_cert, now - timedelta(days=30), now - timedelta(1))
    _client_cert(directory, "early", ca_key, ca_cert, now + timedelta(1), now + timedelta(30))
    return directory


def _client_cert(
    directory: Path,
    name: str,
    ca_key: object,
    ca_cert: x509.Certificate,
    start: datetime,
    end: datetime,
) -> None:
    """A client certificate valid from `start` to `end` (chat-certs never makes these)."""
    key = pki_module.generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pki_module.write_private_key(directory / f"{name}.key", key)
    pki_module.write_certificate(directory / f"{name}.crt", cert)


# ---------------------------------------------------------------- pieces


def test_body_carries_time_and_publisher() -> None:
    body = make_body(64, 7, 123_456_789)
    assert len(body) == 64
    assert int(body[:19]) == 123_456_789 and int(body[19:BODY_HEAD]) == 7


def test_latency_percentiles_are_nearest_rank() -> None:
    samples = array("q", (ms * 1_000_000 for ms in range(1000, 0, -1)))  # 1..1000 ms
    latency = Latency.of(samples)
    assert (latency.p50_ms, latency.p99_ms, latency.p99_9_ms, latency.max_ms) == (
        500.0,
        990.0,
        999.0,
        1000.0,
    )
    assert Latency.of(array("q")).p50_ms is None


def test_tally_counts_measured_deliveries_and_ignores_foreign_bodies() -> None:
    window, flow, sub = Window(), Flow(10), SubscriberCount(0)
    tally = Tally(window, [flow], [0])
    window.place(100, 200)
    tally.on_sent(150, 0, 2, receipted=False)
    flow.owed += 2
    tally.on_delivery(make_body(32, 0, 150), 170, sub)
    tally.on_delivery(make_body(32, 0, 150), 250, sub)  # sent inside, received after the window
    tally.on_delivery(make_body(32, 0, 50), 120, sub)  # warm-up message received inside
    tally.on_delivery(b"hello from someone else", 130, sub)
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


def test_only_confirmed_messages_are_owed_and_deliveries_may_precede_their_receipt() -> None:
    window, flow = Window(), Flow(100)
    a, b = SubscriberCount(0), SubscriberCount(0)
    tally = Tally(window, [flow], [0])
    window.place(100, 200)
    m1, m2, m3 = (make_body(32, 0, sent_at) for sent_at in (110, 120, 130))
    for sent_at in (110, 120, 130):
        tally.on_sent(sent_at, 0, 2, receipted=True)
        flow.owed += 2
    tally.on_delivery(m1, 111, a)  # before its RECEIPT: held until the answer
    assert tally.delivered == 0 and tally.awaiting == 3
    tally.on_outcome(m1, True)
    tally.on_delivery(m1, 112, b)
    tally.on_delivery(m2, 121, a)  # stored after all, but its RECEIPT never came
    tally.on_outcome(m2, False)
    assert flow.owed == 2  # m2's missing delivery is forgiven, m3's two are still owed
    tally.on_delivery(m2, 122, b)
    tally.finish()  # m3: no answer by the end of the run
    assert (tally.sent, tally.confirmed, tally.unconfirmed) == (3, 1, 2)
    assert (tally.expected, tally.delivered, tally.unconfirmed_delivered) == (2, 2, 2)
    assert (a.received, b.received, tally.awaiting) == (1, 1, 0)
    assert len(tally.latencies) == 4
    assert tally.confirmed_by_topic == [1]
    assert SubscriberReport.of(a, tally.confirmed_by_topic).expected == 1


def test_a_subscriber_that_left_is_owed_only_what_was_confirmed_before() -> None:
    count = SubscriberCount(1)
    count.received, count.owed_when_left = 3, 4
    assert SubscriberReport.of(count, [0, 9]) == SubscriberReport(1, 4, 3, 0, 0, 0)


def test_positions_tell_copies_from_late_arrivals() -> None:
    seen = Positions()
    assert seen.first_time("/topic/a", "e1", 5) and seen.first_time("/topic/a", "e1", 6)
    assert not seen.first_time("/topic/a", "e1", 6)  # a copy
    assert seen.first_time("/topic/a", "e1", 9)  # 7 and 8 skipped...
    assert seen.first_time("/topic/a", "e1", 7)  # ...so a late 7 is no copy
    assert not seen.first_time("/topic/a", "e1", 7)
    assert seen.first_time("/topic/a", "e2", 6)  # a new epoch is a new history
    assert seen.first_time("/topic/b", "e1", 6)


@pytest.mark.parametrize("lifetime", [2, 3, 10, 300])
def test_a_shared_token_is_renewed_before_it_can_expire(lifetime: int) -> None:
    """The server's `exp` is a whole second, so a token asked for at T may end as early as
    T + lifetime - 1. Whenever a lease is handed out, the connection's renewal (as
    `keep_authorized` schedules it from the grant) must come before that."""
    asked_at = 1000.0
    lease = Lease.of(TokenGrant("t", lifetime, None), asked_at)
    earliest_end = asked_at + lifetime - TOKEN_CLOCK_GRAIN
    handed = 0
    for step in range(1000):
        now = asked_at + step * lifetime / 1000
        if lease.worn(now):
            continue  # a fresh token is fetched instead
        handed += 1
        grant = lease.grant(now)
        renews_at = now + max(MIN_RENEW_DELAY, RENEW_AT * (grant.expires_in - TOKEN_CLOCK_GRAIN))
        assert renews_at < earliest_end, (now, grant.expires_in)
    assert handed > 0
    if lifetime >= 10:  # long enough to be shared for a good part of its life
        assert not lease.worn(asked_at + 0.4 * lifetime) and lease.worn(asked_at + 0.6 * lifetime)


def test_progress_line_rendering() -> None:
    first = Sample(at=10.0, phase="connecting", connected=3, requested=101, sent=0, delivered=0)
    assert render(None, first) == (
        "\r\x1b[2Kchat-load: connecting  connected 3/101  sent -/s  delivered -/s"
    )
    later = Sample(
        at=12.0, phase="measuring", connected=101, requested=101, sent=400, delivered=40_000
    )
    assert render(first, later) == (
        "\r\x1b[2Kchat-load: measuring  connected 101/101  sent 200/s  delivered 20,000/s"
    )


def test_progress_line_rewrites_itself_and_clears() -> None:
    out = io.StringIO()
    line = ProgressLine(out)
    line.clear()
    assert out.getvalue() == ""  # nothing shown, nothing to clear
    first = Sample(1.0, "warm-up", 2, 2, 10, 10)
    line.show(first)
    line.show(Sample(2.0, "measuring", 2, 2, 20, 30))
    line.clear()
    assert out.getvalue() == (
        render(None, first) + render(first, Sample(2.0, "measuring", 2, 2, 20, 30)) + ERASE_LINE
    )
    assert "\n" not in out.getvalue()
