"""One load run: connect, warm up, measure a fixed window, drain, report, disconnect.

How this works: every connection is a task in one nursery. It opens its link (a few at
a time, under the setup deadline), reports in, then receives (a subscriber) or, once
the run starts, publishes (a publisher) inside a cancel scope the run cancels at the
end. The main task places the measured window, reads the CPU clocks at its edges,
waits (bounded) for the window's messages to arrive, builds the report, and only then
stops the tasks, which disconnect under a deadline. Every phase has a time bound, so a
run always ends by itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import trio

from chat.client.http import ClientError
from chat.load import identities as ids
from chat.load.stats import (
    Connections,
    CpuMeter,
    CpuUse,
    Flow,
    Latency,
    ProcessGone,
    Report,
    Tally,
    Window,
    make_body,
)
from chat.load.transport import Link, StalledLink, raw_link, stalled_link, stomp_link
from chat.pki import PkiError

CONNECT_CONCURRENCY = 16  # links opening at once: each is an ECDSA mTLS handshake on both sides
SETUP_TIMEOUT = 60.0  # all links open and subscribed, or the stragglers count as failed
DRAIN_TIMEOUT = 5.0  # after the window, how long measured messages may still arrive
DRAIN_POLL = 0.01  # how often the drain checks whether everything arrived
STALL_TIMEOUT = 2.0  # a publisher owed this long forgives the debt (lost deliveries)
CLOSE_TIMEOUT = 5.0  # every link disconnects within this, or is cut
TOPIC_PREFIX = "/topic/load.t"  # topic i is /topic/load.t<i>


class LoadError(Exception):
    """The run could not happen (no certificates, server unreachable...): one line, exit 2."""


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """What `chat-load` was asked to do (the CLI validates the numbers)."""

    url: str
    certs: Path
    ca: Path
    subscribers: int
    publishers: int
    topics: int
    rate: float  # messages/s per publisher, 0 = as fast as flow control allows
    max_inflight: int  # messages per publisher not yet delivered to all its subscribers
    size: int
    duration: float
    warmup: float
    server_pid: int | None
    raw: bool = False  # bare WebSocket messages, for benchmarks/baseline_server.py
    stalled: int = 0  # extra subscribers that never read: slow consumers the server must evict


async def run_load(config: LoadConfig) -> Report:
    """Run once and return the report; LoadError when it cannot run at all."""
    identities = await _identities(config)
    return await _Run(config, identities).execute()


async def _identities(config: LoadConfig) -> list[ids.Identity]:
    try:
        named = ids.contexts(ids.find_identities(config.certs), config.ca)
    except (ids.NoIdentities, PkiError) as exc:
        raise LoadError(str(exc)) from None
    if config.raw:
        return [ids.Identity(name, context, None) for name, context in named]
    try:
        return await ids.with_tokens(_base_url(config.url), named)
    except ClientError as exc:
        raise LoadError(f"cannot get an access token: {exc}") from None


def _base_url(ws_url: str) -> str:
    """https://HOST:PORT of a wss:// URL: the token endpoints share the listener."""
    scheme, _, rest = ws_url.partition("://")
    if scheme != "wss" or not rest:
        raise LoadError(f"invalid --url {ws_url!r}: expected wss://HOST:PORT/PATH")
    return "https://" + rest.split("/", 1)[0]


class _Run:
    def __init__(self, config: LoadConfig, identities: list[ids.Identity]) -> None:
        self.config = config
        self.identities = identities
        self.window = Window()
        self.flows = [Flow(0) for _ in range(config.publishers)]
        self.tally = Tally(self.window, self.flows)
        self.fanout = [0] * config.topics  # live subscribers per topic
        self.connected = self.failed = self.dropped = 0
        self.first_error: str | None = None
        self.started = trio.Event()  # publishers wait for it
        self.stopping = False
        self._scopes: list[trio.CancelScope] = []
        self._reported = 0
        self._all_reported = trio.Event()
        self._limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
        self._setup_deadline = 0.0
        self._stalled: list[StalledLink] = []
        self._evicted = 0

    @property
    def total(self) -> int:
        return self.config.subscribers + self.config.publishers

    async def execute(self) -> Report:
        report: Report | LoadError | None = None
        async with trio.open_nursery() as nursery:
            self._setup_deadline = trio.current_time() + SETUP_TIMEOUT
            for index in range(self.total):
                nursery.start_soon(self._connection, index)
            await self._all_reported.wait()
            for index in range(self.config.stalled):
                with trio.fail_after(SETUP_TIMEOUT):
                    await nursery.start(self._stall, index)
            try:
                report = await self._measure() if self._can_run() else None
            except LoadError as exc:  # raised outside the nursery, not inside a group
                report = exc
            finally:
                self._stop()
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        if isinstance(report, LoadError):
            raise report
        if report is None:
            raise LoadError(f"no connection could be used: {self.first_error}")
        return report

    def _can_run(self) -> bool:
        subscribed = sum(self.fanout)
        publishing = self.connected - subscribed
        return subscribed > 0 and publishing > 0

    # ------------------------------------------------------------ connections

    async def _connection(self, index: int) -> None:
        subscriber = index < self.config.subscribers
        position = index if subscriber else index - self.config.subscribers
        topic = position % self.config.topics
        joined = False
        try:
            with trio.CancelScope(deadline=self._setup_deadline) as setup:
                async with AsyncExitStack() as stack:
                    link = await self._open(stack, index, topic, subscriber)
                    setup.deadline = math.inf
                    self._join(topic, subscriber)
                    joined = True
                    if subscriber:
                        await self._keep(self._consume(link, topic))
                    else:
                        await self.started.wait()
                        await self._keep(self._publish(link, position, topic))
            if not joined:
                self._fail(ClientError(f"not connected within the setup time "
                                       f"({SETUP_TIMEOUT:g} s)"))
        except ClientError as exc:
            if not joined:
                self._fail(exc)
            elif not self.stopping:  # errors while disconnecting at the end do not count
                self.dropped += 1
                self._note(exc)

    async def _open(
        self, stack: AsyncExitStack, index: int, topic: int, subscriber: bool
    ) -> Link:
        """Open (and subscribe), a few connections at a time."""
        await self._limiter.acquire()
        try:
            return await stack.enter_async_context(self._dial(index, topic, subscriber))
        finally:
            self._limiter.release()

    async def _stall(self, index: int, task_status: trio.TaskStatus[None]) -> None:
        """One stalled subscriber on topic `index % topics`, held open until the run stops."""
        identity = self.identities[index % len(self.identities)]
        destination = f"{TOPIC_PREFIX}{index % self.config.topics}"
        try:
            async with stalled_link(self.config.url, identity, destination) as link:
                self._stalled.append(link)
                task_status.started()
                await trio.sleep_forever()
        except ClientError as exc:
            raise LoadError(f"a stalled subscriber could not connect: {exc}") from None

    async def _count_evicted(self) -> None:
        async def check(link: StalledLink) -> None:
            evicted = await link.evicted(DRAIN_TIMEOUT)  # not `+= await`: that reads first
            self._evicted += evicted

        async with trio.open_nursery() as nursery:
            for link in self._stalled:
                nursery.start_soon(check, link)

    def _join(self, topic: int, subscriber: bool) -> None:
        self.connected += 1
        self.fanout[topic] += subscriber
        self._report_in()

    def _fail(self, exc: ClientError) -> None:
        self.failed += 1
        self._note(exc)
        self._report_in()

    def _dial(self, index: int, topic: int, subscriber: bool) -> AbstractAsyncContextManager[Link]:
        identity = self.identities[index % len(self.identities)]
        if self.config.raw:
            return raw_link(self.config.url, identity)
        destination = f"{TOPIC_PREFIX}{topic}"
        return stomp_link(self.config.url, identity, destination, subscribe=subscriber)

    def _report_in(self) -> None:
        self._reported += 1
        if self._reported == self.total:
            self._all_reported.set()

    async def _keep(self, work: Coroutine[object, object, None]) -> None:
        """Run a subscriber's or publisher's loop until the run stops it."""
        if self.stopping:
            work.close()
            return
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            await work

    def _note(self, exc: ClientError) -> None:
        if self.first_error is None:
            self.first_error = str(exc)

    # ------------------------------------------------------------ traffic

    async def _consume(self, link: Link, topic: int) -> None:
        receive, on_delivery, now = link.receive, self.tally.on_delivery, time.perf_counter_ns
        try:
            while True:
                on_delivery(await receive(), now())
        finally:
            self.fanout[topic] -= 1

    async def _publish(self, link: Link, index: int, topic: int) -> None:
        """Send until the window ends: paced by --rate, bounded by the flow's debt limit."""
        config, flow, tally = self.config, self.flows[index], self.tally
        interval = int(1e9 / config.rate) if config.rate else 0
        next_at = now = time.perf_counter_ns()
        while now < self.window.end:
            fanout = self.fanout[topic]
            if fanout == 0:
                return  # nobody listens any more: nothing left to measure
            if flow.owed >= flow.limit:
                await flow.wait(STALL_TIMEOUT)
            elif interval and now < next_at:
                await trio.sleep((next_at - now) / 1e9)
            else:
                next_at += interval
                flow.owed += fanout
                tally.on_sent(now, fanout)
                await link.send(make_body(config.size, index, now))
            now = time.perf_counter_ns()

    # ------------------------------------------------------------ the measured window

    async def _measure(self) -> Report:
        config = self.config
        for index, flow in enumerate(self.flows):
            flow.limit = config.max_inflight * max(1, self.fanout[index % config.topics])
            flow.resume_at = flow.limit // 2
        start = time.perf_counter_ns() + int(config.warmup * 1e9)
        self.window.place(start, start + int(config.duration * 1e9))
        self.started.set()
        await _sleep_until_ns(self.window.start)
        meter = _start_meter(config.server_pid)
        await _sleep_until_ns(self.window.end)
        server_s, harness_s = _stop_meter(meter)
        await self._drain()
        await self._count_evicted()
        return self._report(server_s, harness_s)

    async def _drain(self) -> None:
        with trio.move_on_after(DRAIN_TIMEOUT):
            while self.tally.delivered < self.tally.expected and sum(self.fanout):
                await trio.sleep(DRAIN_POLL)

    def _stop(self) -> None:
        self.stopping = True
        self.started.set()  # publishers still waiting for the start leave at once
        for scope in self._scopes:
            scope.cancel()

    def _report(self, server_s: float | None, harness_s: float) -> Report:
        c, tally, window_s = self.config, self.tally, self.window.seconds
        in_window = tally.received_in_window
        harness = CpuUse.of(harness_s, window_s, in_window)
        return Report(
            mode="raw" if c.raw else "stomp", url=c.url, subscribers=c.subscribers,
            publishers=c.publishers, topics=c.topics, size=c.size, rate=c.rate,
            max_inflight=c.max_inflight, warmup_s=c.warmup, window_s=window_s,
            connections=Connections(self.total, self.connected, self.failed, self.dropped,
                                    self.first_error),
            sent=tally.sent, expected=tally.expected, delivered=tally.delivered,
            lost=tally.expected - tally.delivered,
            deliveries_per_s=in_window / window_s if window_s > 0 else 0.0,
            latency=Latency.of(tally.latencies),
            server_cpu=None if server_s is None else CpuUse.of(server_s, window_s, in_window),
            harness_cpu=harness, harness_saturated=harness.saturated,
            stalls=sum(flow.stalls for flow in self.flows), foreign=tally.foreign,
            stalled=c.stalled, evicted=self._evicted,
        )


async def _sleep_until_ns(instant: float) -> None:
    delay = (instant - time.perf_counter_ns()) / 1e9
    if delay > 0:
        await trio.sleep(delay)


def _start_meter(server_pid: int | None) -> CpuMeter:
    try:
        return CpuMeter.start(server_pid)
    except ProcessGone as exc:
        raise LoadError(f"--server-pid: {exc}") from None


def _stop_meter(meter: CpuMeter) -> tuple[float | None, float]:
    try:
        return meter.stop()
    except ProcessGone as exc:
        raise LoadError(f"--server-pid: the server exited during the run ({exc})") from None

