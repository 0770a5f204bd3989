"""Fault benchmark: SIGKILL the server under load, restart it, count what was lost or doubled.

Publishers send with receipts and subscribers read through the client library's
`ResilientSession` (reconnect with backoff, resume by offset) while the server, a
subprocess on the SQLite history, is killed with SIGKILL and restarted several times.
It reports receipted messages some subscriber never saw (must be 0), messages a
subscriber saw twice (must be 0), and how long subscribers took to be back online after
each kill. Exit 0 only when nothing was lost or doubled.

Usage: .venv/bin/python benchmarks/faults.py [--kills 3] [--interval 3] [--rate 50] ...
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import fanout
import trio

from chat import pki
from chat.client.backoff import Backoff
from chat.client.errors import ClientError
from chat.client.messages import Message
from chat.client.resilient import NotDelivered, Online, Recovered, Resilience, open_session

TOPIC = "/topic/faults"
HEARTBEAT = (500, 500)  # ms: a dead server is noticed within about a second
RESILIENCE = Resilience(backoff=Backoff(0.05, 1.0), send_timeout=15.0)
CATCH_UP_TIMEOUT = 20.0  # after the last kill, how long subscribers may take to see everything


@dataclass
class Tally:
    receipted: set[bytes] = field(default_factory=set)
    not_delivered: int = 0  # sends the server never confirmed (never resent)
    seen: list[list[bytes]] = field(default_factory=list)  # per subscriber, in arrival order
    unrecovered: int = 0  # Recovered(ok=False) events
    killed_at: float | None = None
    reconnects: list[float] = field(default_factory=list)  # seconds from a kill to Online


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chat-faults-") as tmp:
        work = Path(tmp)
        certs, _ = pki.ensure_dev_pki(work / "certs", fanout.CLIENTS)
        tally = Tally(seen=[[] for _ in range(args.subscribers)])
        try:
            trio.run(_run, args, work, certs, tally)
        except (fanout.BenchmarkFailed, ClientError) as exc:
            print(f"faults: {exc}", file=sys.stderr)
            return 1
    lost, doubled = _verdict(tally)
    print(_report(args, tally, lost, doubled))
    return 0 if lost == doubled == 0 else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=3, help="SIGKILL + restart cycles")
    p.add_argument("--interval", type=float, default=3.0, help="seconds of load between kills")
    p.add_argument("--down", type=float, default=0.5, help="seconds the server stays dead")
    p.add_argument("--publishers", type=int, default=2)
    p.add_argument("--subscribers", type=int, default=4)
    p.add_argument("--rate", type=float, default=50.0, help="messages/s per publisher")
    return p


class Server:
    """The chat server as a subprocess on a fixed port and state directory."""

    def __init__(self, work: Path, port: int) -> None:
        self.work, self.port = work, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.work / f"server-{self.starts}.log"
        command = [
            sys.executable,
            "-m",
            "chat.server.cli",
            "--port",
            str(self.port),
            "--certs-dir",
            str(self.work / "certs"),
            "--state-dir",
            str(self.work / "state"),
            "--retention-count",
            "1000000",
            *fanout.UNLIMITED,
            "--heartbeat",
            f"{HEARTBEAT[0]},{HEARTBEAT[1]}",
            "--log-level",
            "warning",
        ]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        fanout._wait_ready(self.port, self.proc, log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown, no flush
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            fanout._stop(self.proc)


async def _run(args: argparse.Namespace, work: Path, certs: pki.DevPki, tally: Tally) -> None:
    server = Server(work, fanout._free_port())
    await trio.to_thread.run_sync(server.start)
    url = f"wss://127.0.0.1:{server.port}/ws"
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)
            for index in range(args.subscribers):
                nursery.start_soon(_subscriber, url, certs, index, tally, ready)
            for _ in range(args.subscribers):
                await ready.acquire()
            stop = trio.Event()
            for index in range(args.publishers):
                nursery.start_soon(_publisher, url, certs, index, args.rate, tally, stop)
            for _ in range(args.kills):
                await trio.sleep(args.interval)
                tally.killed_at = trio.current_time()
                await trio.to_thread.run_sync(server.kill)
                await trio.sleep(args.down)
                await trio.to_thread.run_sync(server.start)
            await trio.sleep(args.interval)
            stop.set()
            await _catch_up(tally)
            nursery.cancel_scope.cancel()
    finally:
        server.stop()


def _session(url: str, certs: pki.DevPki, index: int):  # noqa: ANN202 - an async context manager
    cert, key = certs.client(fanout.CLIENTS[index % len(fanout.CLIENTS)])
    return open_session(
        url,
        cert,
        key,
        certs.ca,
        heartbeat=HEARTBEAT,
        resilience=RESILIENCE,
        on_notice=lambda line: None,
    )


async def _subscriber(
    url: str, certs: pki.DevPki, index: int, tally: Tally, ready: trio.Semaphore
) -> None:
    seen = tally.seen[index]
    async with _session(url, certs, index) as session:
        await session.subscribe(TOPIC)
        ready.release()
        async for event in session:
            if isinstance(event, Message):
                seen.append(event.body)
            elif isinstance(event, Online) and not event.first and tally.killed_at is not None:
                tally.reconnects.append(trio.current_time() - tally.killed_at)
            elif isinstance(event, Recovered) and not event.ok:
                tally.unrecovered += 1


async def _publisher(
    url: str, certs: pki.DevPki, index: int, rate: float, tally: Tally, stop: trio.Event
) -> None:
    async with _session(url, certs, index) as session:
        n = 0
        while not stop.is_set():
            body = f"p{index}-{n}".encode()
            n += 1
            try:
                await session.send(TOPIC, body, receipt=True)
                tally.receipted.add(body)
            except NotDelivered:
                tally.not_delivered += 1
            await trio.sleep(1 / rate)


async def _catch_up(tally: Tally) -> None:
    with trio.move_on_after(CATCH_UP_TIMEOUT):
        while any(not tally.receipted <= set(seen) for seen in tally.seen):
            await trio.sleep(0.1)


def _verdict(tally: Tally) -> tuple[int, int]:
    lost = sum(len(tally.receipted - set(seen)) for seen in tally.seen)
    doubled = sum(len(seen) - len(set(seen)) for seen in tally.seen)
    return lost, doubled


def _report(args: argparse.Namespace, tally: Tally, lost: int, doubled: int) -> str:
    times = sorted(tally.reconnects)
    reconnect = (
        "-"
        if not times
        else f"min {times[0]:.2f} s, median "
        f"{statistics.median(times):.2f} s, max {times[-1]:.2f} s "
        f"({len(times)} reconnects)"
    )
    rows = [
        (
            "run",
            f"{args.kills} x SIGKILL every {args.interval:g} s (down {args.down:g} s), "
            f"{args.publishers} publishers at {args.rate:g}/s, {args.subscribers} subscribers",
        ),
        ("receipted", f"{len(tally.receipted):,} messages"),
        (
            "not confirmed",
            f"{tally.not_delivered:,} sends (link died before the RECEIPT; never resent)",
        ),
        ("lost", f"{lost:,} receipted messages missing at some subscriber (must be 0)"),
        ("duplicates", f"{doubled:,} messages seen twice by a subscriber (must be 0)"),
        ("not recovered", f"{tally.unrecovered} resubscribes said recovered:false"),
        ("reconnect", f"kill -> subscriber back online: {reconnect}"),
    ]
    return "\n".join(f"{name:<15}{value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
