"""Half-open flood benchmark: do healthy clients connect while 10,000 idle sockets are held?

It starts chat-server pinned to one core (certificates generated in a temporary directory,
the server's soft file limit set to --server-nofile, as many systems start processes), then
a flood process pinned to the other core that opens --sockets TCP connections to the port
and never sends a byte (re-opening each one the server closes, so the pressure lasts), and
meanwhile, every --interval, a healthy client connects: mutual TLS, POST /auth/token, the
WebSocket upgrade with the token, STOMP CONNECT -> CONNECTED. It prints the healthy
clients' connect times (p50, p99, max), failures, the EMFILE lines in the server's log,
and the server's peak open files and memory; with --before DIR the same run first against a
server from DIR (a `git worktree` of an older commit), for a before/after table.

Usage: .venv/bin/python benchmarks/flood.py [--before /tmp/flood-old] [--sockets 10000] ...
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import resource
import selectors
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fanout
import trio

from chat import pki
from chat.client.connection import connect
from chat.client.errors import ClientError
from chat.client.http import fetch_token

HERE = Path(__file__).resolve().parent
PROBES = tuple(f"probe{i}" for i in range(1, 11))  # identities the healthy clients take in turn
GOAL = 2.0  # PROTOCOL.md §12 / issue 11: every healthy client connects within this, s
PROBE_TIMEOUT = 10.0  # a healthy client not connected by then is a failure
FLOOD_READY_TIMEOUT = 30.0  # the flood must have opened its sockets within this
FLOOD_SLACK = 5.0  # the flood stops by itself this long after the probes should be done
SAMPLE_INTERVAL = 0.5  # how often the server's open files and memory are read
EMFILE_MARKERS = ("EMFILE", "Too many open files")


@dataclass(frozen=True, slots=True)
class Setup:
    work: Path
    sockets: int
    healthy: int
    interval: float
    server_nofile: str  # prlimit's SOFT[:HARD]
    server_core: int
    load_core: int

    @property
    def certs(self) -> Path:
        return self.work / "certs"

    @property
    def probing(self) -> float:
        return self.healthy * self.interval


@dataclass
class Result:
    label: str
    command: str
    times: list[float] = field(default_factory=list)  # seconds, connected clients
    failures: Counter[str] = field(default_factory=Counter)
    emfile_lines: int = 0
    peak_fds: int = 0
    peak_rss_kib: int = 0
    flood: dict[str, int] = field(default_factory=dict)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hold":
        return hold(args.port, args.sockets, args.seconds)
    cores = fanout._cores(args.server_core, args.load_core)
    fanout._check_quiet()
    os.sched_setaffinity(0, {cores[1]})  # the healthy clients share the flood's core
    trees = ([("before", Path(args.before).resolve())] if args.before else []) + [
        ("after", HERE.parent)
    ]
    with tempfile.TemporaryDirectory(prefix="chat-flood-") as tmp:
        setup = Setup(
            Path(tmp), args.sockets, args.healthy, args.interval, args.server_nofile, *cores
        )
        pki.ensure_dev_pki(setup.certs, PROBES)
        try:
            results = [_run(setup, label, tree) for label, tree in trees]
        except fanout.BenchmarkFailed as exc:
            print(f"flood: {exc}", file=sys.stderr)
            return 1
    print(_table(setup, results))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", metavar="DIR", help="also run a server from DIR first")
    p.add_argument("--sockets", type=int, default=10_000, help="idle sockets held")
    p.add_argument("--healthy", type=int, default=100, help="healthy clients, one per interval")
    p.add_argument("--interval", type=float, default=0.1, help="s between healthy clients")
    p.add_argument(
        "--server-nofile",
        default="1024",
        metavar="SOFT[:HARD]",
        help="the server's file limit at start, as prlimit takes it; without HARD the hard "
        "limit stays the machine's (default %(default)s)",
    )
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    commands = p.add_subparsers(dest="command")
    flood = commands.add_parser("hold", help="the flood process: hold idle sockets (internal)")
    flood.add_argument("--port", type=int, required=True)
    flood.add_argument("--sockets", type=int, required=True)
    flood.add_argument("--seconds", type=float, required=True)
    return p


# ---------------------------------------------------------------- one run


def _run(setup: Setup, label: str, tree: Path) -> Result:
    port = fanout._free_port()
    log = setup.work / f"{label}.log"
    command = _server_command(setup, tree, port, label)
    result = Result(label, " ".join(command))
    with fanout._process(command, setup.server_core, log) as server:
        fanout._wait_ready(port, server, log)
        with _flood(setup, port) as flood:
            trio.run(_probe, setup, port, server.pid, result)
            flood.send_signal(signal.SIGINT)  # the probes are done: report and stop
            result.flood = dict(json.loads(_read_line(flood, FLOOD_READY_TIMEOUT)))
    text = log.read_text(errors="replace")
    result.emfile_lines = sum(
        any(marker in line for marker in EMFILE_MARKERS) for line in text.splitlines()
    )
    return result


def _server_command(setup: Setup, tree: Path, port: int, label: str) -> list[str]:
    return [
        "env",
        f"--chdir={tree}",  # `python -m` puts the working directory first on the path
        f"PYTHONPATH={tree}",
        "prlimit",
        f"--nofile={_soft_and_hard(setup.server_nofile)}",
        sys.executable,
        "-m",
        "chat.server.cli",
        "--port",
        str(port),
        "--certs-dir",
        str(setup.certs),
        "--state-dir",
        str(setup.work / f"state-{label}"),
        "--log-level",
        "info",
    ]


def _soft_and_hard(limits: str) -> str:
    """prlimit's SOFT: (the soft limit only) unless a hard limit is given."""
    return limits if ":" in limits else f"{limits}:"


@contextlib.contextmanager
def _flood(setup: Setup, port: int):  # noqa: ANN202 - a context manager of a Popen
    seconds = setup.probing + PROBE_TIMEOUT + FLOOD_SLACK
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "hold",
        "--port",
        str(port),
        "--sockets",
        str(setup.sockets),
        "--seconds",
        f"{seconds:g}",
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, preexec_fn=fanout._pin(setup.load_core)
    )
    try:
        assert proc.stdout is not None
        ready = _read_line(proc, FLOOD_READY_TIMEOUT)
        if ready.strip() != "ready":
            raise fanout.BenchmarkFailed(f"the flood did not start: {ready!r}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        raise fanout.BenchmarkFailed(f"the flood said nothing within {timeout:g} s")
    return proc.stdout.readline()


# ---------------------------------------------------------------- the healthy clients


async def _probe(setup: Setup, port: int, pid: int, result: Result) -> None:
    dev = pki.DevPki.at(setup.certs)
    contexts = [pki.client_ssl_context(*dev.client(name), dev.ca) for name in PROBES]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample, pid, result)
        async with trio.open_nursery() as clients:
            for i in range(setup.healthy):
                clients.start_soon(_healthy, port, contexts[i % len(contexts)], result)
                await trio.sleep(setup.interval)
        nursery.cancel_scope.cancel()


async def _healthy(port: int, context: ssl.SSLContext, result: Result) -> None:
    """One healthy client: connected (its time counted) or failed (its reason counted)."""
    start = time.perf_counter()
    connected: float | None = None
    failure = "no CONNECTED"
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            grant = await fetch_token(f"https://127.0.0.1:{port}", context)
            url = f"wss://127.0.0.1:{port}/ws"
            async with connect(url, context, grant.access_token, heartbeat=(0, 0)):
                connected = time.perf_counter() - start
    except trio.TooSlowError:
        failure = f"not connected in {PROBE_TIMEOUT:g} s"
    except (ClientError, OSError) as exc:
        failure = type(exc).__name__
    if connected is not None:  # a failure after CONNECTED (in DISCONNECT) is not counted
        result.times.append(connected)
    else:
        result.failures[failure] += 1


async def _sample(pid: int, result: Result) -> None:
    """The server's open files and peak memory, read from /proc while the flood lasts."""
    while True:
        with contextlib.suppress(OSError):
            result.peak_fds = max(result.peak_fds, len(os.listdir(f"/proc/{pid}/fd")))
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    result.peak_rss_kib = int(line.split()[1])
        await trio.sleep(SAMPLE_INTERVAL)


# ---------------------------------------------------------------- the flood process


def hold(port: int, sockets: int, seconds: float) -> int:
    """Hold `sockets` TCP connections to `port` that never send a byte, for `seconds` or until
    SIGINT: each one the server closes is opened again. Prints "ready" once all are opening,
    then one JSON line of counts."""
    _raise_file_limit()
    selector = selectors.DefaultSelector()
    counts: Counter[str] = Counter()
    for _ in range(sockets):
        _open(selector, port, counts)
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        _keep_open(selector, port, counts, time.monotonic() + seconds)
    counts["held_at_end"] = len(selector.get_map())
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    print(json.dumps(counts), flush=True)
    return 0


def _keep_open(
    selector: selectors.BaseSelector, port: int, counts: Counter[str], deadline: float
) -> None:
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(min(left, 0.5)):
            if _closed(key.fileobj):  # type: ignore[arg-type]
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                counts["closed_by_server"] += 1
                _open(selector, port, counts)


def _raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _open(selector: selectors.BaseSelector, port: int, counts: Counter[str]) -> None:
    sock = socket.socket()
    sock.setblocking(False)
    code = sock.connect_ex(("127.0.0.1", port))
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        counts[f"connect_{errno.errorcode.get(code, code)}"] += 1
        return
    selector.register(sock, selectors.EVENT_READ)
    counts["opened"] += 1


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset, or a connect that failed
        return True


# ---------------------------------------------------------------- the table

COLUMNS = (
    "server",
    "healthy",
    "failed",
    f"<= {GOAL:g} s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "EMFILE lines",
    "peak fds",
    "peak RSS MiB",
    "flood closed",
)


def _table(setup: Setup, results: list[Result]) -> str:
    head = (
        f"half-open flood: {setup.sockets:,} idle TCP sockets held (re-opened when closed); "
        f"{setup.healthy} healthy clients, one every {setup.interval * 1000:g} ms "
        f"(mTLS + token + WebSocket + CONNECT); server file limit {setup.server_nofile} "
        f"(soft[:hard]) at start; server on core {setup.server_core}, flood and clients on core "
        f"{setup.load_core}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    rows = [COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    notes = [
        "connect time: from the start of POST /auth/token to CONNECTED; "
        f"a client not connected within {PROBE_TIMEOUT:g} s is a failure",
        *(
            f"{r.label} failures: {', '.join(f'{n} {why}' for why, n in r.failures.items())}"
            for r in results
            if r.failures
        ),
        *(f"{r.label} flood: {json.dumps(r.flood)}" for r in results),
        "server commands:",
        *(f"  {r.label}: taskset -c {setup.server_core} {r.command}" for r in results),
    ]
    return "\n".join([head, "", *lines, "", *notes])


def _row(result: Result) -> tuple[str, ...]:
    times = sorted(result.times)
    within = sum(t <= GOAL for t in times)
    return (
        result.label,
        f"{len(times) + sum(result.failures.values())}",
        f"{sum(result.failures.values())}",
        f"{within}",
        _ms(statistics.median(times) if times else None),
        _ms(times[math.ceil(len(times) * 0.99) - 1] if times else None),
        _ms(times[-1] if times else None),
        f"{result.emfile_lines:,}",
        f"{result.peak_fds:,}",
        f"{result.peak_rss_kib / 1024:.0f}",
        f"{result.flood.get('closed_by_server', 0):,}",
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


if __name__ == "__main__":
    sys.exit(main())
