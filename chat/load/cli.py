"""`chat-load`: many mTLS STOMP clients against one server; deliveries/s, latency, CPU.

Exit status 0 when the run happened (whatever it measured), 2 with one line on stderr
when it could not (bad option, no certificates, server unreachable or refusing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import trio

from chat.cli_common import EXIT_OK, Parser, UsageError, run_main
from chat.load.progress import ProgressLine
from chat.load.runner import LoadConfig, LoadError, run_load
from chat.load.stats import BODY_HEAD, MAX_PUBLISHERS, CpuUse, ProcessGone, Report
from chat.load.stats import process_cpu_seconds as _cpu_seconds

PROG = "chat-load"
MAX_CONNECTIONS = 20_000  # subscribers + publishers: beyond, file descriptors and RAM run out
MAX_SIZE = 60 * 1024  # the server's default frame limit (64 KiB) minus room for headers
MAX_DURATION = 3600.0  # one measured window; longer soaks are several runs
MAX_WARMUP = 600.0

DESCRIPTION = """\
Load generator for chat-server: opens SUBSCRIBERS + PUBLISHERS connections (mutual TLS,
one shared access token per identity, STOMP over WebSocket through the client library's
resilient session: a server restart during the run costs reconnects, not the run),
publishes for WARMUP + DURATION seconds and reports, for the measured window (the
DURATION after the warm-up): messages sent and how many the server confirmed (RECEIPT:
stored), deliveries vs expected (confirmed x matching subscribers; the difference is
lost), duplicates (by topic, epoch and offset), reconnects, deliveries/s, end-to-end
latency p50/p99/p99.9 (publisher send to subscriber receipt, from a timestamp in the
body), the server's CPU time per delivery (with --server-pid) and the harness's own CPU
use. A harness using ~100% of its core is the bottleneck: its figures then bound the
server from below, and server CPU us/delivery is the number that compares servers. It
stops by itself: setup <= 60 s, then warm-up + duration, <= 5 s of drain, <= 5 s to
disconnect. On a terminal, stderr shows a progress line while it runs.
"""

EPILOG = """\
Pin the server and the harness to different cores, so neither steals the other's CPU
and the server's CPU time is its own:

  taskset -c 0 chat-server --port 8443 --certs-dir certs --state-dir state &
  taskset -c 1 chat-load --certs certs --server-pid $!

More identities for more realistic fan-out: chat-certs client NAME --dir certs.
benchmarks/fanout.py runs this against our server and a minimal baseline server.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        default="wss://127.0.0.1:8443/ws",
        help="the server's STOMP endpoint (default %(default)s); tokens come "
        "from POST /auth/token on the same host and port",
    )
    p.add_argument(
        "--certs",
        type=Path,
        default=Path("certs"),
        metavar="DIR",
        help="client certificates: every NAME.crt with a NAME.key except ca and "
        "server, skipping (with a warning) encrypted keys and certificates "
        "expired, not yet valid or not issued by DIR/ca.crt; connections take "
        "them round-robin, one token each (default %(default)s)",
    )
    p.add_argument(
        "--identities",
        type=_names,
        metavar="NAME,...",
        help="use only these identities of DIR (NAME.crt + NAME.key each); "
        "a missing or unusable one is an error",
    )
    p.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="CA certificate the server must chain to (default DIR/ca.crt)",
    )
    p.add_argument(
        "--subscribers",
        type=int,
        default=100,
        metavar="N",
        help="subscribing connections (default %(default)s)",
    )
    p.add_argument(
        "--publishers",
        type=int,
        default=1,
        metavar="P",
        help="publishing connections (default %(default)s)",
    )
    p.add_argument(
        "--topics",
        type=int,
        default=1,
        metavar="T",
        help="topics; subscribers and publishers are spread over them "
        "round-robin (default %(default)s)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="R",
        help="messages/s per publisher; 0 = as fast as --max-inflight allows "
        "(default %(default)s). At 0, latency is mostly time queued behind "
        "--max-inflight: measure latency at a rate below saturation",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=64,
        metavar="M",
        help="a publisher pauses while M of its messages are not yet delivered "
        "to all their subscribers, so neither side's buffers grow without bound "
        "(default %(default)s)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=128,
        metavar="BYTES",
        help=f"message body size, at least {BODY_HEAD} (default %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="S",
        help="measured window in seconds (default %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        metavar="S",
        help="publishing before the window opens, not counted (default %(default)s)",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="read the server's CPU time (/proc/PID/stat) at the window's edges: "
        "reports server CPU seconds and us per delivery",
    )
    p.add_argument(
        "--stalled",
        type=int,
        default=0,
        metavar="N",
        help="also open N subscribers that never read (slow consumers); the report "
        "says how many the server evicted, and latency shows whether the healthy "
        "subscribers noticed (default 0)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--raw",
        action="store_true",
        help="advanced: bare WebSocket text messages, no token and no STOMP, for "
        "benchmarks/baseline_server.py (needs --publishers 1 --topics 1)",
    )
    return p


def config_of(args: argparse.Namespace) -> LoadConfig:
    """A LoadConfig from parsed options, or UsageError naming the first bad one."""
    _check(args)
    return LoadConfig(
        url=args.url,
        certs=args.certs,
        ca=args.ca or args.certs / "ca.crt",
        subscribers=args.subscribers,
        publishers=args.publishers,
        topics=args.topics,
        rate=args.rate,
        max_inflight=args.max_inflight,
        size=args.size,
        duration=args.duration,
        warmup=args.warmup,
        server_pid=args.server_pid,
        raw=args.raw,
        stalled=args.stalled,
        identities=args.identities or (),
    )


def _names(value: str) -> tuple[str, ...]:
    """--identities a,b,c as a tuple of names (blanks ignored, repeats once)."""
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected NAME[,NAME...]")
    return names


def _check(args: argparse.Namespace) -> None:
    rules = [
        (args.subscribers >= 1, "--subscribers must be at least 1"),
        (1 <= args.publishers < MAX_PUBLISHERS, f"--publishers must be 1..{MAX_PUBLISHERS - 1}"),
        (
            args.subscribers + args.publishers <= MAX_CONNECTIONS,
            f"at most {MAX_CONNECTIONS} connections in all",
        ),
        (1 <= args.topics <= args.subscribers, "--topics must be 1..SUBSCRIBERS"),
        (args.rate >= 0, "--rate cannot be negative"),
        (args.max_inflight >= 1, "--max-inflight must be at least 1"),
        (BODY_HEAD <= args.size <= MAX_SIZE, f"--size must be {BODY_HEAD}..{MAX_SIZE}"),
        (0 < args.duration <= MAX_DURATION, f"--duration must be in (0, {MAX_DURATION:g}]"),
        (0 <= args.warmup <= MAX_WARMUP, f"--warmup must be in [0, {MAX_WARMUP:g}]"),
        (0 <= args.stalled <= MAX_CONNECTIONS, f"--stalled must be 0..{MAX_CONNECTIONS}"),
        (not args.raw or not args.stalled, "--stalled needs STOMP (not --raw)"),
        (
            not args.raw or (args.publishers == 1 and args.topics == 1),
            "--raw needs --publishers 1 --topics 1 (the baseline forwards to everyone)",
        ),
    ]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    if args.server_pid is not None:
        try:
            _cpu_seconds(args.server_pid)
        except ProcessGone as exc:
            raise UsageError(f"--server-pid: {exc}") from None


# ---------------------------------------------------------------- output


def _warn(line: str) -> None:
    print(f"{PROG}: warning: {line}", file=sys.stderr)


def as_json(report: Report) -> str:
    return json.dumps(dataclasses.asdict(report))


def as_table(report: Report) -> str:
    r, c, lat = report, report.connections, report.latency
    rate = "max" if r.rate == 0 else f"{r.rate:g}/s per publisher"
    rows = [
        (
            "run",
            f"{r.mode} {r.url}: {r.subscribers} subscribers, {r.publishers} publishers, "
            f"{r.topics} topics, {r.size} B, rate {rate}, max in flight {r.max_inflight}",
        ),
        ("identities", ", ".join(r.identities)),
        (
            "connections",
            f"{c.connected} of {c.requested} connected, {c.failed} failed, "
            f"{c.dropped} dropped, {c.reconnects} reconnects"
            + (f" (first error: {c.first_error})" if c.first_error else ""),
        ),
        ("window", f"{r.window_s:.2f} s after {r.warmup_s:g} s of warm-up"),
        ("sent", _sent(r)),
        (
            "delivered",
            f"{r.delivered:,} of {r.expected:,} expected ({r.lost:,} lost: "
            "confirmed but never received)",
        ),
        ("duplicates", f"{r.duplicates:,} (same topic, epoch and offset twice)"),
        ("subscribers", _per_subscriber(r)),
        ("deliveries/s", f"{r.deliveries_per_s:,.0f}"),
        (
            "latency ms",
            f"p50 {_ms(lat.p50_ms)}  p99 {_ms(lat.p99_ms)}  "
            f"p99.9 {_ms(lat.p99_9_ms)}  max {_ms(lat.max_ms)}  "
            f"({lat.samples:,} samples)",
        ),
        ("server CPU", _server_cpu(r)),
        (
            "harness CPU",
            _cpu(r.harness_cpu)
            + ("  SATURATED: the harness limits these figures" if r.harness_saturated else ""),
        ),
        (
            "flow stalls",
            f"{r.stalls} (publisher waits that timed out: lost deliveries, or the server was away)",
        ),
        *(
            [
                (
                    "stalled",
                    f"{r.evicted} of {r.stalled} never-reading subscribers evicted "
                    "by the server (slow consumer)",
                )
            ]
            if r.stalled
            else []
        ),
        *(
            [("foreign", f"{r.foreign:,} messages not sent by this run, ignored")]
            if r.foreign
            else []
        ),
    ]
    return "\n".join(f"{name:<14}{value}" for name, value in rows)


def _sent(r: Report) -> str:
    if r.mode == "raw":
        return f"{r.sent:,} messages (raw: no receipts, all counted as accepted)"
    line = f"{r.sent:,} messages, {r.confirmed:,} confirmed by the server"
    if r.unconfirmed:
        line += (
            f", {r.unconfirmed:,} unconfirmed (the link died before the RECEIPT; "
            f"{r.unconfirmed_delivered:,} deliveries of them came anyway)"
        )
    return line


def _per_subscriber(r: Report) -> str:
    subs = r.per_subscriber
    if not subs:
        return "-"
    short = sum(s.received < s.expected for s in subs)
    line = (
        f"received {_span(s.received for s in subs)} of {_span(s.expected for s in subs)} "
        f"expected ({short} short), reconnects {_span(s.reconnects for s in subs)} each"
    )
    return line + (f", {r.unrecovered} resumes not recovered" if r.unrecovered else "")


def _span(values: Iterable[int]) -> str:
    ordered = sorted(values)
    low, high = ordered[0], ordered[-1]
    return f"{low:,}" if low == high else f"{low:,}..{high:,}"


def _server_cpu(r: Report) -> str:
    if r.server_cpu is not None:
        return _cpu(r.server_cpu)
    if r.server_exited:
        return "not measured: the --server-pid process exited during the window"
    return "not measured (--server-pid)"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cpu(use: CpuUse) -> str:
    per = "-" if use.us_per_delivery is None else f"{use.us_per_delivery:.2f}"
    return f"{use.seconds:.2f} s = {use.percent_of_core:.0f}% of a core, {per} us/delivery"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one load test; 0 when it ran, 2 (one line on stderr) when it could not, 130 on
    Ctrl-C."""
    return run_main(PROG, partial(_main, argv), (LoadError,))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    config = config_of(args)
    progress = ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    report = trio.run(partial(run_load, config, warn=_warn, progress=progress))
    print(as_json(report) if args.json else as_table(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
