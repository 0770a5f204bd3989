"""What a load run counts, and the numbers it reports.

How this works: every message body starts with the publisher's send time
(`time.perf_counter_ns()`, one clock for the whole harness process) and the publisher's
index; the pair names the message. The measured window is a fixed interval of that clock.
A message is *measured* when it was sent inside the window. In STOMP mode each SEND asks
for a RECEIPT, which the server gives once the message is stored: a measured message is
*confirmed* by it, or *unconfirmed* when the link died first (the server may or may not
have stored it). Only a confirmed message is owed to subscribers: `expected` adds its
number of matching subscribers, `delivered` its deliveries, and `lost` is the difference,
so a message sent into a dying socket is never counted as lost. Deliveries may arrive
before their RECEIPT, so they wait with the message until the answer comes. Subscribers
pass each delivery through `Positions` first: a copy of an offset already seen is counted
as a duplicate and goes no further. Independently, every delivery *received* inside the
window counts towards deliveries/s, the figure that server CPU time over the same window
is divided by. Flow control lives here too: each publisher owes deliveries for what it
sent, and waits while it owes too many.
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
MAX_PUBLISHERS: int = 10**PUB_DIGITS  # the index must fit its digits
MAX_HOLES = 1_000_000  # offsets skipped at once that Positions remembers; beyond, history is gone
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
    fields = raw[raw.rindex(b")") + 2 :].split()  # the command name may contain spaces
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

    def settle(self, deliveries: int = 1) -> None:
        """Deliveries arrived, or will never be owed (called per delivery: keep it tiny)."""
        self.owed -= deliveries
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


class SubscriberCount:
    """What one subscriber got: the per-subscriber lines of the report."""

    __slots__ = ("topic", "received", "duplicates", "reconnects", "unrecovered", "owed_when_left")

    def __init__(self, topic: int) -> None:
        self.topic = topic
        self.received = 0  # confirmed measured messages received (each once)
        self.duplicates = 0  # deliveries of an offset already received
        self.reconnects = 0  # links re-established after the first
        self.unrecovered = 0  # resubscribes the server answered recovered:false
        self.owed_when_left: int | None = None  # left early: confirmed messages on its topic then


class Positions:
    """Offsets a subscriber has received, per (destination, epoch): tells copies apart.

    The server delivers each topic in offset order, so the fast path is one comparison;
    offsets skipped over are kept as holes, so a late arrival is not taken for a copy.
    """

    __slots__ = ("_top", "_holes")

    def __init__(self) -> None:
        self._top: dict[tuple[str, str], int] = {}
        self._holes: dict[tuple[str, str], set[int]] = {}

    def first_time(self, destination: str, epoch: str, offset: int) -> bool:
        """True the first time this offset of this topic's history arrives."""
        key = (destination, epoch)
        top = self._top.get(key, 0)
        if offset > top:
            if top and offset > top + 1 and offset - top <= MAX_HOLES:
                self._holes.setdefault(key, set()).update(range(top + 1, offset))
            self._top[key] = offset
            return True
        holes = self._holes.get(key)
        if holes and offset in holes:
            holes.discard(offset)
            return True
        return False


class _InFlight:
    """A message sent with a receipt requested and not yet answered."""

    __slots__ = ("publisher", "fanout", "measured", "receivers")

    def __init__(self, publisher: int, fanout: int, measured: bool) -> None:
        self.publisher = publisher
        self.fanout = fanout  # subscribers on its topic when it was sent
        self.measured = measured
        self.receivers: list[SubscriberCount] = []  # who got it before the answer came


class Tally:
    """Counters shared by every task of a run (one trio thread: no locks needed)."""

    def __init__(self, window: Window, flows: list[Flow], topic_of: list[int]) -> None:
        self.window = window
        self.flows = flows
        self._topic_of = topic_of  # publisher index -> topic index
        self.sent = 0  # measured messages sent
        self.confirmed = 0  # of those, stored by the server (RECEIPT; raw mode: all)
        self.unconfirmed = 0  # of those, no RECEIPT: the link died first, or the run ended
        self.unconfirmed_delivered = 0  # deliveries of those: the server had them after all
        self.expected = 0  # deliveries owed for confirmed messages (subscribers at send time)
        self.delivered = 0  # deliveries of confirmed measured messages
        self.confirmed_by_topic = [0] * (max(topic_of, default=0) + 1)
        self.received_in_window = 0  # deliveries of any message received inside the window
        self.sent_total = 0  # every message sent, warm-up included (progress line)
        self.received_total = 0  # every delivery of ours (progress line)
        self.foreign = 0  # bodies not sent by this run: ignored
        self.latencies = array("q")  # ns, one per delivered measured message
        self._in_flight: dict[int, _InFlight] = {}  # message key -> awaiting its RECEIPT
        self._refused: set[int] = set()  # keys of measured messages never confirmed

    @property
    def awaiting(self) -> int:
        """Messages whose RECEIPT has not come yet."""
        return len(self._in_flight)

    def on_sent(self, sent_at: int, publisher: int, fanout: int, receipted: bool) -> None:
        """A message went out; `receipted`: its RECEIPT will be reported to `on_outcome`."""
        self.sent_total += 1
        measured = sent_at in self.window
        self.sent += measured
        if receipted:
            self._in_flight[_key(sent_at, publisher)] = _InFlight(publisher, fanout, measured)
        elif measured:  # raw mode: no receipts, everything sent counts as accepted
            self._confirm(publisher, fanout)

    def on_outcome(self, body: bytes, confirmed: bool) -> None:
        """The server confirmed the message in `body`, or the link died before it could."""
        key = _key(int(body[:TS_DIGITS]), int(body[TS_DIGITS:BODY_HEAD]))
        flight = self._in_flight.pop(key, None)
        if flight is None:
            return
        if confirmed:
            if flight.measured:
                self._confirm(flight.publisher, flight.fanout)
                self.delivered += len(flight.receivers)
                for receiver in flight.receivers:
                    receiver.received += 1
            return
        # nothing more is owed for it: whatever still comes is a bonus, not a debt
        self.flows[flight.publisher].settle(max(0, flight.fanout - len(flight.receivers)))
        if flight.measured:
            self._refuse(key, flight)

    def finish(self) -> None:
        """The run is over: messages still without an answer count as unconfirmed."""
        for key, flight in list(self._in_flight.items()):
            if flight.measured:
                self._refuse(key, flight)
        self._in_flight.clear()

    def on_delivery(self, body: bytes, now: int, receiver: SubscriberCount) -> None:
        """Account one received body (the per-delivery hot path of the harness)."""
        try:
            sent_at = int(body[:TS_DIGITS])
            publisher = int(body[TS_DIGITS:BODY_HEAD])
            self.flows[publisher].settle()
        except (ValueError, IndexError):  # someone else publishing on our topics
            self.foreign += 1
            return
        self.received_total += 1
        window = self.window
        if window.start <= now < window.end:
            self.received_in_window += 1
        key = sent_at * MAX_PUBLISHERS + publisher  # _key(), inlined: this runs per delivery
        flight = self._in_flight.get(key) if self._in_flight else None
        if flight is not None:
            flight.receivers.append(receiver)
        if not window.start <= sent_at < window.end:
            return
        if len(self.latencies) < MAX_LATENCY_SAMPLES:  # Latency.samples shows a cut
            self.latencies.append(now - sent_at)
        if flight is not None:
            return  # counted once its RECEIPT says whether it is owed
        if self._refused and key in self._refused:
            self.unconfirmed_delivered += 1
        else:
            self.delivered += 1
            receiver.received += 1

    def _confirm(self, publisher: int, fanout: int) -> None:
        self.confirmed += 1
        self.expected += fanout
        self.confirmed_by_topic[self._topic_of[publisher]] += 1

    def _refuse(self, key: int, flight: _InFlight) -> None:
        self.unconfirmed += 1
        self.unconfirmed_delivered += len(flight.receivers)
        self._refused.add(key)


def _key(sent_at: int, publisher: int) -> int:
    """One int naming a message: its send time and its publisher."""
    return sent_at * MAX_PUBLISHERS + publisher


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
    def of(cls, samples_ns: array[int]) -> Latency:
        ordered = sorted(samples_ns)
        if not ordered:
            return cls(0, None, None, None, None)
        p50, p99, p99_9 = (_nearest_rank(ordered, q) / 1e6 for q in (0.50, 0.99, 0.999))
        return cls(len(ordered), p50, p99, p99_9, ordered[-1] / 1e6)


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
        """(server CPU seconds, harness CPU seconds) since `start`; the server's is None when
        not measured, or when its process is gone (restarted during the window)."""
        harness = time.process_time() - self.harness_start
        if self.server_pid is None or self.server_start is None:
            return None, harness
        try:
            return process_cpu_seconds(self.server_pid) - self.server_start, harness
        except ProcessGone:
            return None, harness


@dataclass(frozen=True, slots=True)
class Connections:
    requested: int
    connected: int
    failed: int  # could not connect or subscribe
    dropped: int  # connected, then lost for good before the run ended
    first_error: str | None
    reconnects: int = 0  # links re-established by resilient sessions (subscribers + publishers)


@dataclass(frozen=True, slots=True)
class SubscriberReport:
    """One subscriber's account: confirmed messages owed vs received, copies, reconnects."""

    topic: int
    expected: int  # confirmed measured messages on its topic (until it left, if it did)
    received: int  # of those, how many it got
    duplicates: int  # deliveries of an offset it already had (must be 0)
    reconnects: int  # links it re-established
    unrecovered: int  # resubscribes the server answered recovered:false

    @classmethod
    def of(cls, count: SubscriberCount, confirmed_by_topic: list[int]) -> SubscriberReport:
        owed = confirmed_by_topic[count.topic]
        if count.owed_when_left is not None:
            owed = count.owed_when_left
        return cls(
            count.topic, owed, count.received, count.duplicates, count.reconnects, count.unrecovered
        )


@dataclass(frozen=True, slots=True)
class Report:
    """Everything a run measured; `chat-load --json` prints it as one object."""

    mode: str  # "stomp", or "raw" (plain WebSocket messages, for the baseline server)
    url: str
    identities: tuple[str, ...]  # the client certificates the connections took round-robin
    subscribers: int
    publishers: int
    topics: int
    size: int
    rate: float  # messages/s per publisher; 0 = as fast as flow control allows
    max_inflight: int
    warmup_s: float
    window_s: float
    connections: Connections
    sent: int  # messages sent in the window
    confirmed: int  # of those, receipted by the server (stored); raw mode: all of them
    unconfirmed: int  # of those, not receipted: the link died first (or the run ended)
    unconfirmed_delivered: int  # deliveries of unconfirmed messages (stored after all)
    expected: int  # confirmed messages x subscribers on their topic
    delivered: int  # deliveries of confirmed messages, each subscriber counted once
    lost: int  # expected - delivered: messages the server accepted that a subscriber never got
    duplicates: int  # deliveries of an offset a subscriber already had (must be 0)
    unrecovered: int  # resubscribes after a reconnect that said recovered:false
    deliveries_per_s: float
    latency: Latency
    server_cpu: CpuUse | None  # None without --server-pid, or when that process exited
    harness_cpu: CpuUse
    harness_saturated: bool
    stalls: int
    foreign: int  # received messages this run did not send (another client on the topics)
    per_subscriber: tuple[SubscriberReport, ...] = ()
    stalled: int = 0  # subscribers that never read (--stalled)
    evicted: int = 0  # of those, how many the server closed as slow consumers (1008)
    server_exited: bool = False  # the --server-pid process ended during the window (restart)
