"""Fan-out benchmark: chat-server against a minimal baseline, measured in the same run.

For each rate (as fast as flow control allows, then a fixed rate) it starts a server
pinned to one core with certificates generated in a temporary directory, runs chat-load
pinned to another core (1 publisher -> 100 subscribers, 128 B bodies, fixed window),
stops the server, and does the same against benchmarks/baseline_server.py with
`chat-load --raw`. It prints one table: deliveries/s, server CPU us per delivery, latency
p50/p99, and the ratio ours/baseline. See benchmarks/README.md for what each number means.

Usage: .venv/bin/python benchmarks/fanout.py [--duration 10] [--fixed-rate 100] ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat import pki

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "baseline_server.py"
CLIENTS = ("load1", "load2", "load3", "load4")  # identities the connections take round-robin
READY_TIMEOUT = 20.0  # a server must accept TCP within this after its start
LOAD_SLACK = 90.0  # chat-load's own bounds: setup, drain and close, on top of warm-up + window
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL after this
QUIET_LOAD = 0.5  # 1-minute load average above which other processes share our cores
LOG_TAIL = 2000  # characters of a failed process's log worth showing
# The fan-out path is measured, not the limits against abusive clients: a few load identities
# hold every connection and one connection publishes as fast as it can.
UNLIMITED = ("--publish-rate", "0", "--max-connections-per-identity", "1000000")


class BenchmarkFailed(Exception):
    """A server did not start, or chat-load did not produce a report."""


@dataclass(frozen=True, slots=True)
class Setup:
    work: Path  # temporary directory: certs, state, logs
    duration: float
    warmup: float
    subscribers: int
    size: int
    server_core: int
    load_core: int

    @property
    def certs(self) -> Path:
        return self.work / "certs"


@dataclass(frozen=True, slots=True)
class Result:
    server: str  # "chat" or "baseline"
    rate: float
    report: dict[str, Any]
    command: str


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cores = _cores(args.server_core, args.load_core)
    _check_quiet()
    with tempfile.TemporaryDirectory(prefix="chat-fanout-") as tmp:
        setup = Setup(Path(tmp), args.duration, args.warmup, args.subscribers, args.size, *cores)
        pki.ensure_dev_pki(setup.certs, CLIENTS)
        rates = [0.0] + ([args.fixed_rate] if args.fixed_rate > 0 else [])
        try:
            results = [
                _run(setup, server, rate) for rate in rates for server in ("chat", "baseline")
            ]
        except BenchmarkFailed as exc:
            print(f"fanout: {exc}", file=sys.stderr)
            return 1
    print(_table(setup, results))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured window per run, s")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up before each window, s")
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--size", type=int, default=128, help="message body bytes")
    p.add_argument(
        "--fixed-rate",
        type=float,
        default=100.0,
        help="messages/s of the second pair of runs, low enough that no harness "
        "saturates; 0 skips it (default %(default)s)",
    )
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    return p


def _check_quiet() -> None:
    busy = os.getloadavg()[0]
    if busy > QUIET_LOAD:
        print(
            f"fanout: warning: load average {busy:.2f}: other work on this machine will "
            "skew the numbers",
            file=sys.stderr,
        )


def _cores(server: int, load: int) -> tuple[int, int]:
    available = sorted(os.sched_getaffinity(0))
    if server not in available or load not in available or server == load:
        print(
            f"fanout: warning: cores {server} and {load} are not two distinct usable "
            f"cores (have {available}); results mix server and harness CPU",
            file=sys.stderr,
        )
    return server, load


# ---------------------------------------------------------------- one run


def _run(
    setup: Setup,
    server: str,
    rate: float,
    server_args: Sequence[str] = (),
    load_args: Sequence[str] = (),
) -> Result:
    port = _free_port()
    log = setup.work / f"{server}-{rate:g}-{len(load_args)}.log"
    server_command = [*_server_command(setup, server, port), *server_args]
    with _process(server_command, setup.server_core, log) as proc:
        _wait_ready(port, proc, log)
        command = [*_load_command(setup, server, port, proc.pid, rate), *load_args]
        report = _load(command, setup)
    return Result(server, rate, report, " ".join(command))


def _server_command(setup: Setup, server: str, port: int) -> list[str]:
    if server == "baseline":
        return [sys.executable, str(BASELINE), "--port", str(port), "--certs-dir", str(setup.certs)]
    return [
        sys.executable,
        "-m",
        "chat.server.cli",
        "--port",
        str(port),
        "--certs-dir",
        str(setup.certs),
        "--state-dir",
        str(setup.work / "state"),
        *UNLIMITED,
        "--log-level",
        "warning",
    ]


def _load_command(setup: Setup, server: str, port: int, pid: int, rate: float) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "chat.load.cli",
        "--url",
        f"wss://127.0.0.1:{port}/ws",
        "--certs",
        str(setup.certs),
        "--subscribers",
        str(setup.subscribers),
        "--publishers",
        "1",
        "--size",
        str(setup.size),
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{setup.duration:g}",
        "--warmup",
        f"{setup.warmup:g}",
        "--server-pid",
        str(pid),
        "--json",
    ]
    return [*command, "--raw"] if server == "baseline" else command


def _load(command: list[str], setup: Setup) -> dict[str, Any]:
    limit = setup.warmup + setup.duration + LOAD_SLACK
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, preexec_fn=_pin(setup.load_core)
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkFailed(f"chat-load did not finish within {limit:g} s") from None
    if done.returncode != 0:
        raise BenchmarkFailed(f"chat-load exited {done.returncode}: {done.stderr.strip()}")
    return json.loads(done.stdout)


@contextmanager
def _process(command: list[str], core: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server process pinned to `core`, logging to `log`; stopped (bounded) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_pin(core)
        )
        try:
            yield proc
        finally:
            _stop(proc)


def _pin(core: int) -> Callable[[], None]:
    """A preexec_fn: the child is pinned before it runs any of its own code."""
    return lambda: os.sched_setaffinity(0, {core})


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkFailed(f"server exited {proc.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchmarkFailed(f"server not listening on {port} after {READY_TIMEOUT:g} s")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL:].strip()


# ---------------------------------------------------------------- the table

COLUMNS = (
    "rate",
    "server",
    "deliveries/s",
    "server us/deliv",
    "server CPU",
    "p50 ms",
    "p99 ms",
    "lost",
    "harness CPU",
)


def _table(setup: Setup, results: list[Result]) -> str:
    head = (
        f"fan-out: 1 publisher -> {setup.subscribers} subscribers, {setup.size} B, "
        f"{setup.duration:g} s window after {setup.warmup:g} s warm-up; "
        f"server on core {setup.server_core}, chat-load on core {setup.load_core}"
    )
    rows = [COLUMNS]
    for ours, base in zip(results[::2], results[1::2], strict=True):
        rows += [_row(ours), _row(base), _ratio(ours, base)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    notes = [
        "ratio = chat / baseline (deliveries/s: higher is better; us/delivery and latency: "
        "lower is better)",
        "harness CPU near 100% means chat-load, not the server, set the pace of that run",
        "commands:",
        *(f"  {r.command}" for r in results),
    ]
    return "\n".join([head, "", *lines, "", *notes])


def _row(result: Result) -> tuple[str, ...]:
    r = result.report
    server_cpu, latency = r["server_cpu"] or {}, r["latency"]
    return (
        "max" if result.rate == 0 else f"{result.rate:g}/s",
        result.server,
        f"{r['deliveries_per_s']:,.0f}",
        _num(server_cpu.get("us_per_delivery")),
        f"{server_cpu.get('percent_of_core', 0):.0f}%",
        _num(latency["p50_ms"]),
        _num(latency["p99_ms"]),
        f"{r['lost']:,}",
        f"{r['harness_cpu']['percent_of_core']:.0f}%",
    )


def _ratio(ours: Result, base: Result) -> tuple[str, ...]:
    def ratio(pick: Any) -> str:
        a, b = pick(ours.report), pick(base.report)
        return "-" if not a or not b else f"{a / b:.2f}x"

    return (
        "",
        "ratio",
        ratio(lambda r: r["deliveries_per_s"]),
        ratio(lambda r: (r["server_cpu"] or {}).get("us_per_delivery")),
        "",
        ratio(lambda r: r["latency"]["p50_ms"]),
        ratio(lambda r: r["latency"]["p99_ms"]),
        "",
        "",
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
