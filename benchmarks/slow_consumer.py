"""Slow-consumer benchmark: do stalled subscribers move the healthy subscribers' latency?

Two runs of the real server (pinned to one core, chat-load on the other, same fixed rate):
one with only healthy subscribers, one with N extra subscribers that never read. The
server must evict the stalled ones (ERROR `slow consumer`, close) once their outbound
buffer passes its byte limit, and the healthy subscribers' p50/p99 must not move and no
message may be lost. Prints both runs and the ratio.

Usage: .venv/bin/python benchmarks/slow_consumer.py [--stalled 5] [--duration 10] ...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import fanout

from chat import pki


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cores = fanout._cores(args.server_core, args.load_core)
    fanout._check_quiet()
    server_args = ["--outbound-buffer-bytes", str(args.buffer)]
    with tempfile.TemporaryDirectory(prefix="chat-slow-") as tmp:
        setup = fanout.Setup(
            Path(tmp), args.duration, args.warmup, args.subscribers, args.size, *cores
        )
        pki.ensure_dev_pki(setup.certs, fanout.CLIENTS)
        try:
            runs = [
                fanout._run(setup, "chat", args.rate, server_args, ["--stalled", str(n)])
                for n in (0, args.stalled)
            ]
        except fanout.BenchmarkFailed as exc:
            print(f"slow_consumer: {exc}", file=sys.stderr)
            return 1
    print(_table(args, runs))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stalled", type=int, default=5, help="never-reading subscribers")
    p.add_argument("--subscribers", type=int, default=50, help="healthy subscribers")
    p.add_argument("--rate", type=float, default=100.0, help="messages/s")
    p.add_argument("--size", type=int, default=4096, help="message body bytes")
    p.add_argument(
        "--buffer",
        type=int,
        default=256 * 1024,
        help="the server's --outbound-buffer-bytes (default %(default)s)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured window, s")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up, s")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    return p


def _table(args: argparse.Namespace, runs: list[fanout.Result]) -> str:
    head = (
        f"slow consumers: 1 publisher -> {args.subscribers} healthy subscribers, "
        f"{args.size} B at {args.rate:g}/s, server --outbound-buffer-bytes {args.buffer}"
    )
    rows = [
        (
            "stalled",
            "evicted",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "lost",
            "server us/deliv",
        )
    ]
    for run in runs:
        r = run.report
        lat = r["latency"]
        rows.append(
            (
                str(r["stalled"]),
                str(r["evicted"]),
                f"{r['deliveries_per_s']:,.0f}",
                fanout._num(lat["p50_ms"]),
                fanout._num(lat["p99_ms"]),
                fanout._num(lat["p99_9_ms"]),
                f"{r['lost']:,}",
                fanout._num((r["server_cpu"] or {}).get("us_per_delivery")),
            )
        )
    base, stalled = (run.report["latency"] for run in runs)
    ratio = (
        "",
        "ratio",
        "",
        *(
            f"{stalled[k] / base[k]:.2f}x" if base[k] else "-"
            for k in ("p50_ms", "p99_ms", "p99_9_ms")
        ),
        "",
        "",
    )
    rows.append(ratio)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    commands = ["commands:", *(f"  {run.command}" for run in runs)]
    return "\n".join([head, "", *lines, "", *commands])


if __name__ == "__main__":
    sys.exit(main())
