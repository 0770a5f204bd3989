"""One load run: connect, warm up, measure a fixed window, drain, report, disconnect.

How this works: every connection is a task in one nursery. It opens its link (a few at
a time, under the setup deadline), reports in, then receives (a subscriber) or, once
the run starts, publishes (a publisher) until the window ends and stays connected for
the RECEIPTs still due, inside a cancel scope the run cancels at the end. In STOMP mode
a link is a resilient session, so a server restart costs it a reconnect, not the run.
The main task places the measured window, reads the CPU clocks at its edges, waits
(bounded) for the window's RECEIPTs and deliveries, builds the report, and only then
stops the tasks, which disconnect under a deadline. Every phase has a time bound, so a
run always ends by itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from chat.client.errors import ClientError
from chat.load import identities as ids
from chat.load.progress import INTERVAL, Progress, Sample
from chat.load.stats import (
    Connections,
    CpuMeter,
    CpuUse,
    Flow,
    Latency,
    ProcessGone,
    Report,
    SubscriberCount,
    SubscriberReport,
    Tally,
    Window,
    make_body,
)
from chat.load.transport import (
    Receiver,
    Sender,
    StalledLink,
    raw_link,
    stalled_link,
    stomp_publisher,
    stomp_subscriber,
)
from chat.pki import PkiError

CONNECT_CONCURRENCY = 16  # links opening at once: each is an ECDSA mTLS handshake on both sides
SETUP_TIMEOUT = 60.0  # all links open and subscribed, or the stragglers count as failed
DRAIN_TIMEOUT = 5.0  # after the window, how long measured messages (and RECEIPTs) may still come
DRAIN_POLL = 0.01  # how often the drain checks whether everything arrived
STALL_TIMEOUT = 2.0  # a publisher owed this long forgives the debt (lost deliveries)
CLOSE_TIMEOUT = 5.0  # every link disconnects within this, or is cut
TOPIC_PREFIX = "/topic/load.t"  # topic i is /topic/load.t<i>

L = TypeVar("L", Receiver, Sender)
Warn = Callable[[str], None]


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
    identities: tuple[str, ...] = ()  # certificates to use by name; () = every usable one


def _quiet(line: str) -> None:
    """Warnings nobody asked to see."""


async def run_load(
    config: LoadConfig, *, warn: Warn = _quiet, progress: Progress | None = None
) -> Report:
    """Run once and return the report; LoadError when it cannot run at all.

    `warn` hears one line per certificate skipped and per token notice; `progress` gets
    the run's counters about once a second.
    """
    identities = await _identities(config, warn)
    return await _Run(config, identities, progress).execute()


async def _identities(config: LoadConfig, warn: Warn) -> list[ids.Identity]:
    try:
        files = ids.find_identities(config.certs, config.identities)
        issuer = ids.issuer_of(config.certs, config.ca)
        named, skipped = ids.load_contexts(files, config.ca, issuer)
    except (ids.NoIdentities, PkiError) as exc:
        raise LoadError(str(exc)) from None
    if skipped and config.identities:  # asked for by name: not ours to leave out
        raise LoadError(f"identity {skipped[0].name}: {skipped[0].reason}")
    for skip in skipped:
        warn(f"skipping identity {skip.name}: {skip.reason}")
    if not named:
        raise LoadError(f"no usable client certificate in {config.certs} ({len(skipped)} skipped)")
    if config.raw:
        return [ids.Identity(name, context, None) for name, context in named]
    try:
        return await ids.with_tokens(_base_url(config.url), named, warn)
    except ClientError as exc:
        raise LoadError(f"cannot get an access token: {exc}") from None


def _base_url(ws_url: str) -> str:
    """https://HOST:PORT of a wss:// URL: the token endpoints share the listener."""
    scheme, _, rest = ws_url.partition("://")
    if scheme != "wss" or not rest:
        raise LoadError(f"invalid --url {ws_url!r}: expected wss://HOST:PORT/PATH")
    return "https://" + rest.split("/", 1)[0]


class _Run:
    def __init__(
        self, config: LoadConfig, identities: list[ids.Identity], progress: Progress | None
    ) -> None:
        self.config = config
        self.identities = identities
        self.progress = progress
        self.window = Window()
        self.flows = [Flow(0) for _ in range(config.publishers)]
        topic_of = [index % config.topics for index in range(config.publishers)]
        self.tally = Tally(self.window, self.flows, topic_of)
        self.counts = [
            SubscriberCount(index % config.topics) for index in range(config.subscribers)
        ]
        self.fanout = [0] * config.topics  # live subscribers per topic
        self.connected = self.failed = self.dropped = 0
        self.first_error: str | None = None
        self.phase = "connecting"
        self.started = trio.Event()  # publishers wait for it
        self.stopping = False
        self._scopes: list[trio.CancelScope] = []
        self._reported = 0
        self._all_reported = trio.Event()
        self._limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
        self._setup_deadline = 0.0
        self._live: set[Receiver | Sender] = set()  # open links, for the progress line
        self._senders: list[Sender] = []
        self._stalled: list[StalledLink] = []
        self._evicted = 0

    @property
    def total(self) -> int:
        return self.config.subscribers + self.config.publishers

    async def execute(self) -> Report:
        report: Report | LoadError | None = None
        try:
            async with trio.open_nursery() as nursery:
                if self.progress is not None:
                    nursery.start_soon(self._keep, self._tick(self.progress))
                self._setup_deadline = trio.current_time() + SETUP_TIMEOUT
                for index in range(self.config.subscribers):
                    nursery.start_soon(self._subscriber, index)
                for index in range(self.config.publishers):
                    nursery.start_soon(self._publisher, index)
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
        finally:
            if self.progress is not None:
                self.progress.clear()
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

    async def _subscriber(self, index: int) -> None:
        count = self.counts[index]
        identity = self.identities[index % len(self.identities)]
        dial: AbstractAsyncContextManager[Receiver] = (
            raw_link(self.config.url, identity)
            if self.config.raw
            else stomp_subscriber(self.config.url, identity, _destination(count.topic), count)
        )
        await self._hold(dial, count.topic, True, lambda link: self._consume(link, count))

    async def _publisher(self, index: int) -> None:
        topic = index % self.config.topics
        identity = self.identities[(self.config.subscribers + index) % len(self.identities)]
        dial: AbstractAsyncContextManager[Sender] = (
            raw_link(self.config.url, identity)
            if self.config.raw
            else stomp_publisher(
                self.config.url, identity, _destination(topic), self.tally.on_outcome
            )
        )
        await self._hold(dial, topic, False, lambda link: self._publish(link, index, topic))

    async def _hold(
        self,
        dial: AbstractAsyncContextManager[L],
        topic: int,
        subscriber: bool,
        work: Callable[[L], Coroutine[object, object, None]],
    ) -> None:
        """Open a link (under the setup deadline), count it in, run `work` on it until the
        run stops it; count what went wrong."""
        joined = False
        try:
            with trio.CancelScope(deadline=self._setup_deadline) as setup:
                async with AsyncExitStack() as stack:
                    link = await self._open(stack, dial)
                    setup.deadline = math.inf
                    self._join(topic, subscriber)
                    joined = True
                    self._live.add(link)
                    try:
                        await self._keep(work(link))
                    finally:
                        self._live.discard(link)
            if not joined:
                self._fail(
                    ClientError(f"not connected within the setup time ({SETUP_TIMEOUT:g} s)")
                )
        except ClientError as exc:
            if not joined:
                self._fail(exc)
            elif not self.stopping:  # errors while disconnecting at the end do not count
                self.dropped += 1
                self._note(exc)

    async def _open(self, stack: AsyncExitStack, dial: AbstractAsyncContextManager[L]) -> L:
        """Open (and subscribe), a few connections at a time."""
        await self._limiter.acquire()
        try:
            return await stack.enter_async_context(dial)
        finally:
            self._limiter.release()

    async def _stall(self, index: int, task_status: trio.TaskStatus[None]) -> None:
        """One stalled subscriber on topic `index % topics`, held open until the run stops."""
        identity = self.identities[index % len(self.identities)]
        try:
            async with stalled_link(
                self.config.url, identity, _destination(index % self.config.topics)
            ) as link:
                self._stalled.append(link)
                task_status.started()
                await self._keep(trio.sleep_forever())
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

    def _report_in(self) -> None:
        self._reported += 1
        if self._reported == self.total:
            self._all_reported.set()

    async def _keep(self, work: Coroutine[object, object, None]) -> None:
        """Run a task's loop until the run stops it."""
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

    async def _consume(self, link: Receiver, count: SubscriberCount) -> None:
        receive, on_delivery, now = link.receive, self.tally.on_delivery, time.perf_counter_ns
        try:
            while True:
                on_delivery(await receive(), now(), count)
        finally:
            self.fanout[count.topic] -= 1
            if not self.stopping:  # it leaves: what was confirmed until now is all it is owed
                count.owed_when_left = self.tally.confirmed_by_topic[count.topic]

    async def _publish(self, link: Sender, index: int, topic: int) -> None:
        """Send until the window ends: paced by --rate, bounded by the flow's debt limit;
        then stay connected, as RECEIPTs of what was sent are still to come."""
        self._senders.append(link)
        await self.started.wait()
        config, flow, tally = self.config, self.flows[index], self.tally
        receipted = not config.raw
        interval = int(1e9 / config.rate) if config.rate else 0
        next_at = now = time.perf_counter_ns()
        while now < self.window.end:
            fanout = self.fanout[topic]
            if fanout == 0:
                break  # nobody listens any more: nothing left to measure
            if flow.owed >= flow.limit:
                await flow.wait(STALL_TIMEOUT)
            elif interval and now < next_at:
                await trio.sleep((next_at - now) / 1e9)
            else:
                next_at += interval
                flow.owed += fanout
                tally.on_sent(now, index, fanout, receipted)
                await link.send(make_body(config.size, index, now))
            now = time.perf_counter_ns()
        await trio.sleep_forever()

    async def _tick(self, progress: Progress) -> None:
        """The progress line's samples, about once a second."""
        while True:
            progress.show(
                Sample(
                    trio.current_time(),
                    self.phase,
                    sum(link.online for link in self._live),
                    self.total,
                    self.tally.sent_total,
                    self.tally.received_total,
                )
            )
            await trio.sleep(INTERVAL)

    # ------------------------------------------------------------ the measured window

    async def _measure(self) -> Report:
        config = self.config
        for index, flow in enumerate(self.flows):
            flow.limit = config.max_inflight * max(1, self.fanout[index % config.topics])
            flow.resume_at = flow.limit // 2
        start = time.perf_counter_ns() + int(config.warmup * 1e9)
        self.window.place(start, start + int(config.duration * 1e9))
        self.phase = "warm-up"
        self.started.set()
        await _sleep_until_ns(self.window.start)
        self.phase = "measuring"
        meter = _start_meter(config.server_pid)
        await _sleep_until_ns(self.window.end)
        server_s, harness_s = meter.stop()
        self.phase = "draining"
        await self._drain()
        await self._count_evicted()
        self.tally.finish()
        return self._report(server_s, harness_s)

    async def _drain(self) -> None:
        """Wait (bounded) for every RECEIPT and every delivery owed."""
        tally = self.tally
        with trio.move_on_after(DRAIN_TIMEOUT):
            while (tally.awaiting or tally.delivered < tally.expected) and sum(self.fanout):
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
        per_subscriber = tuple(
            SubscriberReport.of(count, tally.confirmed_by_topic) for count in self.counts
        )
        reconnects = sum(s.reconnects for s in per_subscriber) + sum(
            link.reconnects for link in self._senders
        )
        return Report(
            mode="raw" if c.raw else "stomp",
            url=c.url,
            identities=tuple(identity.name for identity in self.identities),
            subscribers=c.subscribers,
            publishers=c.publishers,
            topics=c.topics,
            size=c.size,
            rate=c.rate,
            max_inflight=c.max_inflight,
            warmup_s=c.warmup,
            window_s=window_s,
            connections=Connections(
                self.total, self.connected, self.failed, self.dropped, self.first_error, reconnects
            ),
            sent=tally.sent,
            confirmed=tally.confirmed,
            unconfirmed=tally.unconfirmed,
            unconfirmed_delivered=tally.unconfirmed_delivered,
            expected=tally.expected,
            delivered=tally.delivered,
            lost=tally.expected - tally.delivered,
            duplicates=sum(s.duplicates for s in per_subscriber),
            unrecovered=sum(s.unrecovered for s in per_subscriber),
            deliveries_per_s=in_window / window_s if window_s > 0 else 0.0,
            latency=Latency.of(tally.latencies),
            server_cpu=None if server_s is None else CpuUse.of(server_s, window_s, in_window),
            harness_cpu=harness,
            harness_saturated=harness.saturated,
            stalls=sum(flow.stalls for flow in self.flows),
            foreign=tally.foreign,
            per_subscriber=per_subscriber,
            stalled=c.stalled,
            evicted=self._evicted,
            server_exited=c.server_pid is not None and server_s is None,
        )


def _destination(topic: int) -> str:
    return f"{TOPIC_PREFIX}{topic}"


async def _sleep_until_ns(instant: float) -> None:
    delay = (instant - time.perf_counter_ns()) / 1e9
    if delay > 0:
        await trio.sleep(delay)


def _start_meter(server_pid: int | None) -> CpuMeter:
    try:
        return CpuMeter.start(server_pid)
    except ProcessGone as exc:
        raise LoadError(f"--server-pid: {exc}") from None
