"""Memory benchmark: the server's RSS per 10k topics, per 1k idle connections, and after a
restart with a large retained history (issue 11).

Each server under test (this tree, and with `--compare DIR` another checkout of the project
put first on PYTHONPATH, e.g. a `git worktree` of an older commit) runs as a subprocess on the
SQLite history, with certificates generated in a temporary directory, in four steps:

1. start it, connect one client: the fresh RSS;
2. publish one message to each of `--topics` distinct topics: RSS per 10k topics;
3. open `--connections` idle STOMP connections (no heart-beats): RSS per 1k connections;
4. publish `--large` messages of `--large-bytes` over `--large-topics` topics, stop the server
   (SIGTERM) and start it again on the same state: RSS after the restart (one client again).

RSS is VmRSS from /proc/PID/status, read after a short settle. The servers inherit the
environment (`MALLOC_MMAP_THRESHOLD_=32768` makes glibc return freed 60 KiB bodies to the
system, so RSS shows what is still held rather than what the allocator kept). Every step is
bounded in time (`--timeout` per server); a failed step prints one line and exits 1.

Usage: .venv/bin/python benchmarks/memory.py [--compare /tmp/mem-old] [--topics 10000] ...
"""

from __future__ import annotations

import argparse
import os
import shlex
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import fanout
import trio

from chat import pki
from chat.client.connection import StompClient, connect
from chat.client.errors import ClientError
from chat.client.http import fetch_token

IDENTITY = fanout.CLIENTS[0]
SETTLE = 1.0  # seconds between the last step and reading RSS: the server finishes its work
CONNECT_BATCH = 50  # idle connections opened at once
SERVER_FLAGS = ("--max-connections-per-identity", "1000000", "--log-level", "warning")


@dataclass(frozen=True, slots=True)
class Figures:
    """RSS in KiB at each step of one server's run."""

    fresh: int
    topics: int
    connections: int
    large: int
    restarted: int


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    servers = [("this tree", None)]
    if args.compare:
        servers.insert(0, (f"{args.compare}", args.compare))
    results = []
    with tempfile.TemporaryDirectory(prefix="chat-memory-") as tmp:
        work = Path(tmp)
        certs, _ = pki.ensure_dev_pki(work / "certs", fanout.CLIENTS)
        for index, (label, path) in enumerate(servers):
            try:
                run = _Server(work / f"run{index}", certs, path, args.server_args)
                figures = trio.run(_run, args, run, certs)
            except (fanout.BenchmarkFailed, ClientError, trio.TooSlowError) as exc:
                print(f"memory: {label}: {exc or 'timed out'}", file=sys.stderr)
                return 1
            results.append((label, figures))
    print(_table(args, results))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="another checkout to run first, as before")
    parser.add_argument("--topics", type=int, default=10_000, help="topics, one message each")
    parser.add_argument("--connections", type=int, default=1000, help="idle connections")
    parser.add_argument("--large", type=int, default=3000, help="large messages retained")
    parser.add_argument("--large-bytes", type=int, default=60 * 1024, help="their body size")
    parser.add_argument("--large-topics", type=int, default=30, help="topics they go to")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per server")
    parser.add_argument(
        "--server-args",
        type=shlex.split,
        default=[],
        help='more server options, one string: --server-args "--history-memory-bytes 16777216"',
    )
    return parser


async def _run(args: argparse.Namespace, server: _Server, certs: pki.DevPki) -> Figures:
    with trio.fail_after(args.timeout):
        with server.running():
            async with _client(server, certs) as (client, token):
                fresh = await server.rss()
                for i in range(args.topics):
                    await client.send(f"/topic/mem.t{i}", b"x", receipt=i == args.topics - 1)
                topics = await server.rss()
                connections = await _idle_connections(server, certs, token, args.connections)
                body = b"y" * args.large_bytes
                for i in range(args.large):
                    last = i == args.large - 1
                    await client.send(f"/topic/mem.big{i % args.large_topics}", body, receipt=last)
                large = await server.rss()
        with server.running():
            async with _client(server, certs):
                restarted = await server.rss()
    return Figures(fresh, topics, connections, large, restarted)


async def _idle_connections(server: _Server, certs: pki.DevPki, token: str, n: int) -> int:
    """Open `n` idle connections; the RSS while they are all open (then they close)."""
    opening = trio.CapacityLimiter(CONNECT_BATCH)
    opened = trio.Semaphore(0)
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(_hold, server, certs, token, opening, opened, done)
        for _ in range(n):
            await opened.acquire()
        rss = await server.rss()
        done.set()
    return rss


async def _hold(
    server: _Server,
    certs: pki.DevPki,
    token: str,
    opening: trio.CapacityLimiter,
    opened: trio.Semaphore,
    done: trio.Event,
) -> None:
    async with AsyncExitStack() as stack:
        async with opening:
            await stack.enter_async_context(
                connect(server.ws_url, _context(certs), token, heartbeat=(0, 0))
            )
        opened.release()
        await done.wait()


def _context(certs: pki.DevPki) -> ssl.SSLContext:
    return pki.client_ssl_context(*certs.client(IDENTITY), certs.ca)


class _client:  # noqa: N801 - used like a function: `async with _client(...)`
    """One connected client and its access token."""

    def __init__(self, server: _Server, certs: pki.DevPki) -> None:
        self._server, self._certs = server, certs
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> tuple[StompClient, str]:
        context = _context(self._certs)
        grant = await fetch_token(self._server.base_url, context)
        client = await self._stack.enter_async_context(
            connect(self._server.ws_url, context, grant.access_token, heartbeat=(0, 0))
        )
        return client, grant.access_token

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


class _Server:
    """One server under test: a subprocess on a state directory kept across restarts."""

    def __init__(
        self, work: Path, certs: pki.DevPki, path: Path | None, options: list[str]
    ) -> None:
        self._work, self._certs, self._options = work, certs, options
        self._env = dict(os.environ)
        if path is not None:
            self._env["PYTHONPATH"] = str(path)
        self.port = fanout._free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.ws_url = f"wss://127.0.0.1:{self.port}/ws"
        self._pid = 0

    @contextmanager
    def running(self) -> Iterator[None]:
        self._work.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "chat.server.cli",
            "--port",
            str(self.port),
            "--certs-dir",
            str(self._certs.directory),
            "--state-dir",
            str(self._work / "state"),
            *SERVER_FLAGS,
            *self._options,
        ]
        log = self._work / "server.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self._env)
            try:
                fanout._wait_ready(self.port, proc, log)
                self._pid = proc.pid
                yield
            finally:
                fanout._stop(proc)

    async def rss(self) -> int:
        await trio.sleep(SETTLE)
        status = Path(f"/proc/{self._pid}/status").read_text()
        return next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )


def _table(args: argparse.Namespace, results: list[tuple[str, Figures]]) -> str:
    per_topics = 10_000 / max(args.topics, 1)
    per_conns = 1000 / max(args.connections, 1)
    rows = [
        (
            "server",
            "fresh",
            "per 10k topics",
            "per 1k idle conns",
            f"after {args.large} x {args.large_bytes // 1024} KiB",
            "after restart",
        ),
        *(
            (
                label,
                _mib(f.fresh),
                _mib((f.topics - f.fresh) * per_topics, "+"),
                _mib((f.connections - f.topics) * per_conns, "+"),
                _mib(f.large),
                f"{_mib(f.restarted)} ({_mib(f.restarted - f.fresh, '+')} vs fresh)",
            )
            for label, f in results
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines) + "\n(RSS, MiB; the per-step figures are differences)"


def _mib(kib: float, sign: str = "") -> str:
    return f"{sign if kib >= 0 else ''}{kib / 1024:.1f}"


if __name__ == "__main__":
    sys.exit(main())
