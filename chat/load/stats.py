"""What a load run counts, and the numbers it reports.

How this works: every message body starts with the publisher's send time
(`time.perf_counter_ns()`, one clock for the whole harness process) and the publisher's
index. The measured window is a fixed interval of that clock. A message is *measured* when
it was sent inside the window: `expected` adds its number of matching subscribers, and
each of its deliveries adds one to `delivered` and one latency sample. Independently,
every delivery *received* inside the window counts towards deliveries/s, the figure that
server CPU time over the same window is divided by. Flow control lives here too: each
publisher owes deliveries for what it sent, and waits while it owes too many.
"""

from __future__ import annotations

import math
import os
import time
from array import array
from dataclasses import dataclass

import trio

TS_DIGITS = 19  # perf_counter_ns() in decimal, zero-padded: fits any uptime below 317 years
PUB_DIGITS = 4  # publisher index in decimal
BODY_HEAD = TS_DIGITS + PUB_DIGITS  # the smallest body that can carry both
MAX_PUBLISHERS = 10**PUB_DIGITS  # the index must fit its digits
MAX_LATENCY_SAMPLES = 10_000_000  # 80 MB of int64: beyond this, samples are dropped (counted)
SATURATED_PERCENT = 90.0  # a harness using this much of one core limits the numbers it reports
PAD = b"."  # fills bodies up to --size; plain ASCII keeps them STOMP text frames
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # units of utime/stime in /proc/PID/stat
_STAT_UTIME = 11  # utime's index among the /proc/PID/stat fields after "(comm) "; stime follows


class ProcessGone(Exception):
    """The --server-pid process cannot be read (it exited, or the pid is wrong)."""


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by process `pid` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError as exc:
        raise ProcessGone(f"cannot read /proc/{pid}/stat: {exc.strerror}") from None
    fields = raw[raw.rindex(b")") + 2:].split()  # the command name may contain spaces
    return (int(fields[_STAT_UTIME]) + int(fields[_STAT_UTIME + 1])) / _CLOCK_TICKS


def make_body(size: int, publisher: int, sent_at: int) -> bytes:
    """A message body of exactly `size` bytes carrying the send time and publisher index."""
    return b"%019d%04d" % (sent_at, publisher) + PAD * (size - BODY_HEAD)


class Window:
    """The measured interval, in `perf_counter_ns()` time; empty until `place()`."""

    __slots__ = ("start", "end")

    def __init__(self) -> None:
        self.start = self.end = math.inf  # nothing is measured before the run places it

    def place(self, start: int, end: int) -> None:
        self.start, self.end = start, end

    def __contains__(self, instant: int) -> bool:
        return self.start <= instant < self.end

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e9


class Flow:
    """One publisher's debt: deliveries its messages still owe. Bounds what is in flight."""

    __slots__ = ("owed", "limit", "resume_at", "stalls", "_wake")

    def __init__(self, limit: int) -> None:
        self.owed = 0
        self.limit = limit  # deliveries; the publisher pauses at this debt...
        self.resume_at = limit // 2  # ...and resumes below this, so it does not wake per delivery
        self.stalls = 0  # waits that timed out: deliveries were lost or a subscriber left
        self._wake: trio.Event | None = None

    def settle(self) -> None:
        """One delivery arrived (called per delivery: keep it tiny)."""
        self.owed -= 1
        if self._wake is not None and self.owed <= self.resume_at:
            self._wake.set()

    async def wait(self, timeout: float) -> None:
        """Pause while the debt is at its limit; after `timeout`, forgive it and go on."""
        self._wake = trio.Event()
        with trio.move_on_after(timeout) as scope:
            await self._wake.wait()
        self._wake = None
        if scope.cancelled_caught:
            self.stalls += 1
            self.owed = 0


class Tally:
    """Counters shared by every task of a run (one trio thread: no locks needed)."""

    def __init__(self, window: Window, flows: list[Flow]) -> None:
        self.window = window
        self.flows = flows
        self.sent = 0  # measured messages sent
        self.expected = 0  # their deliveries, by the subscriber count at send time
        self.delivered = 0  # deliveries of measured messages
        self.received_in_window = 0  # deliveries of any message received inside the window
        self.foreign = 0  # bodies not sent by this run: ignored
        self.latencies = array("q")  # ns, one per delivered measured message

    def on_sent(self, sent_at: int, fanout: int) -> None:
        if sent_at in self.window:
            self.sent += 1
            self.expected += fanout

    def on_delivery(self, body: bytes, now: int) -> None:
        """Account one received body (the per-delivery hot path of the harness)."""
        try:
            sent_at = int(body[:TS_DIGITS])
            self.flows[int(body[TS_DIGITS:BODY_HEAD])].settle()
        except (ValueError, IndexError):  # someone else publishing on our topics
            self.foreign += 1
            return
        window = self.window
        if window.start <= now < window.end:
            self.received_in_window += 1
        if window.start <= sent_at < window.end:
            self.delivered += 1
            if len(self.latencies) < MAX_LATENCY_SAMPLES:  # Latency.samples shows a cut
                self.latencies.append(now - sent_at)


# ---------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class Latency:
    """End-to-end latency of measured messages, publisher's send to subscriber's receipt."""

    samples: int
    p50_ms: float | None
    p99_ms: float | None
    p99_9_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, samples_ns: array) -> Latency:
        ordered = sorted(samples_ns)
        if not ordered:
            return cls(0, None, None, None, None)
        pick = [_nearest_rank(ordered, q) / 1e6 for q in (0.50, 0.99, 0.999)]
        return cls(len(ordered), *pick, ordered[-1] / 1e6)


def _nearest_rank(ordered: list[int], quantile: float) -> int:
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU seconds a process used during the window, as a share of one core and per delivery."""

    seconds: float
    percent_of_core: float
    us_per_delivery: float | None

    @classmethod
    def of(cls, seconds: float, window_s: float, deliveries: int) -> CpuUse:
        per = seconds * 1e6 / deliveries if deliveries else None
        return cls(seconds, 100.0 * seconds / window_s if window_s > 0 else 0.0, per)

    @property
    def saturated(self) -> bool:
        return self.percent_of_core >= SATURATED_PERCENT


@dataclass(frozen=True, slots=True)
class CpuMeter:
    """CPU clocks read at the window's start, to subtract at its end."""

    server_pid: int | None
    server_start: float | None
    harness_start: float

    @classmethod
    def start(cls, server_pid: int | None) -> CpuMeter:
        server = process_cpu_seconds(server_pid) if server_pid is not None else None
        return cls(server_pid, server, time.process_time())

    def stop(self) -> tuple[float | None, float]:
        """(server CPU seconds or None, harness CPU seconds) since `start`."""
        harness = time.process_time() - self.harness_start
        if self.server_pid is None or self.server_start is None:
            return None, harness
        return process_cpu_seconds(self.server_pid) - self.server_start, harness


@dataclass(frozen=True, slots=True)
class Connections:
    requested: int
    connected: int
    failed: int  # could not connect or subscribe
    dropped: int  # connected, then lost before the run ended
    first_error: str | None


@dataclass(frozen=True, slots=True)
class Report:
    """Everything a run measured; `chat-load --json` prints it as one object."""

    mode: str  # "stomp", or "raw" (plain WebSocket messages, for the baseline server)
    url: str
    subscribers: int
    publishers: int
    topics: int
    size: int
    rate: float  # messages/s per publisher; 0 = as fast as flow control allows
    max_inflight: int
    warmup_s: float
    window_s: float
    connections: Connections
    sent: int
    expected: int
    delivered: int
    lost: int
    deliveries_per_s: float
    latency: Latency
    server_cpu: CpuUse | None
    harness_cpu: CpuUse
    harness_saturated: bool
    stalls: int
    foreign: int  # received messages this run did not send (another client on the topics)
    stalled: int = 0  # subscribers that never read (--stalled)
    evicted: int = 0  # of those, how many the server closed as slow consumers (1008)
