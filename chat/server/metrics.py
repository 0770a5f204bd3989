"""Prometheus metrics (PROTOCOL.md §12): a collector over plain ints, served by `--metrics`.

How this works: nothing on the fan-out path touches prometheus_client. The broker adds to its
`published` and `delivered` ints once per publish, the server to `Stats` once per handshake or
eviction, and `ChatCollector.collect()` reads them when Prometheus scrapes. Delivery latency
is a sample: each publish stamps its first recipient's outbox, and that connection's writer
observes the histogram once the `send_all` carrying the frame returns. The certificates'
expiry is read from their files on a worker thread at each scrape. The listener is plain
HTTP with h11 on trio, one short task per scrape; anything but `GET /metrics` is 404.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import h11
import trio
from cryptography import x509
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chat.server.broker import Broker
from chat.server.broker import Outbox as Recipient
from chat.server.connection import Outbox

log = logging.getLogger("chat.server")

PATH = b"/metrics"
OK = "ok"  # chat_handshakes_total{result}: an upgrade accepted
TLS_FAILED = "tls_failed"  # a TLS handshake that failed or timed out, or an unusable certificate
# From a fast local write to a consumer the kernel makes wait.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SCRAPE_TIMEOUT = 10.0  # a scraper's request head and our answer, together
MAX_SCRAPE_HEAD = 8 * 1024  # a scraper's request line and headers are short


class Stats:
    """What the server counts per handshake and per slow-consumer eviction, as plain ints."""

    __slots__ = ("evictions", "handshakes")

    def __init__(self) -> None:
        self.handshakes: dict[str, int] = {}  # by result: ok, a refusal code, tls_failed
        self.evictions = 0

    def handshake(self, result: str) -> None:
        self.handshakes[result] = self.handshakes.get(result, 0) + 1


class ChatCollector(Collector):
    """Reads the server's ints on each scrape, so counting costs an addition, not a lock."""

    def __init__(self, stats: Stats, broker: Broker, connections: Callable[[], int]) -> None:
        self._stats = stats
        self._broker = broker
        self._connections = connections
        self.expiry: dict[str, float] = {}  # notAfter by certificate, refreshed per scrape

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "chat_connections", "Live STOMP connections.", value=self._connections()
        )
        yield _labelled(
            CounterMetricFamily(
                "chat_handshakes",
                "WebSocket upgrades by result: ok, the refusal code, or tls_failed.",
                labels=["result"],
            ),
            self._stats.handshakes,
        )
        yield CounterMetricFamily(
            "chat_messages_published",
            "Messages stored (a direct message once per inbox copy).",
            value=self._broker.published,
        )
        yield CounterMetricFamily(
            "chat_messages_delivered",
            "MESSAGE frames queued to subscribers (fan-out, replays excluded).",
            value=self._broker.delivered,
        )
        yield CounterMetricFamily(
            "chat_slow_consumer_evictions",
            "Connections closed because their outbound buffer overflowed.",
            value=self._stats.evictions,
        )
        yield _labelled(
            GaugeMetricFamily(
                "chat_certificate_expiry_timestamp_seconds",
                "When each certificate in force expires (notAfter, Unix time).",
                labels=["cert"],
            ),
            self.expiry,
        )


class Metrics:
    """The server's registry (its own, not the global one): the chat collector, the delivery
    latency histogram and prometheus_client's process metrics."""

    def __init__(
        self,
        stats: Stats,
        broker: Broker,
        connections: Callable[[], int],
        certificates: Mapping[str, Path],
    ) -> None:
        self.registry = CollectorRegistry()
        self._chat = ChatCollector(stats, broker, connections)
        self.registry.register(self._chat)
        ProcessCollector(registry=self.registry)
        self.latency = Histogram(
            "chat_delivery_latency_seconds",
            "From a SEND being handled to the write of its MESSAGE (first recipient only).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._certificates = dict(certificates)
        broker.sample = _stamp

    async def scrape(self) -> bytes:
        """The text format, with the certificates' expiry re-read from their files."""
        expiry = await trio.to_thread.run_sync(certificate_expiry, self._certificates)
        self._chat.expiry.update(expiry)
        return generate_latest(self.registry)


def certificate_expiry(certificates: Mapping[str, Path]) -> dict[str, float]:
    """BLOCKING: notAfter of each readable certificate file (of a bundle, the earliest)."""
    expiry = {}
    for name, path in certificates.items():
        try:
            found = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):  # gone or half-written: the last value read stays
            continue
        expiry[name] = min(cert.not_valid_after_utc.timestamp() for cert in found)
    return expiry


async def serve_metrics(metrics: Metrics, listeners: list[trio.SocketListener]) -> None:
    """Answer scrapes on `listeners` until cancelled."""
    host, port, *_ = listeners[0].socket.getsockname()
    log.info(
        "metrics on http://%s:%d/metrics",
        host,
        port,
        extra={"event": "metrics_listening", "host": host, "port": port},
    )
    await trio.serve_listeners(partial(_answer, metrics), listeners)


async def _answer(metrics: Metrics, stream: trio.abc.Stream) -> None:
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_SCRAPE_HEAD)
    with trio.move_on_after(SCRAPE_TIMEOUT):
        try:
            target = await _read_target(stream, http)
            if target is not None:
                await stream.send_all(await _response(metrics, http, target))
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def _read_target(stream: trio.abc.Stream, http: h11.Connection) -> bytes | None:
    """The target of a GET (b"" for another method: answered 404), or None: no request."""
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(bytes(await stream.receive_some(MAX_SCRAPE_HEAD)))
        elif isinstance(event, h11.Request):
            return bytes(event.target) if event.method == b"GET" else b""
        else:
            return None


async def _response(metrics: Metrics, http: h11.Connection, target: bytes) -> bytes:
    if target.split(b"?", 1)[0] == PATH:
        status, content_type, body = 200, CONTENT_TYPE_LATEST, await metrics.scrape()
    else:
        status, content_type, body = 404, "text/plain; charset=utf-8", b"not found\n"
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    data = http.send(h11.Response(status_code=status, headers=headers)) or b""
    return data + (http.send(h11.Data(data=body)) or b"") + (http.send(h11.EndOfMessage()) or b"")


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[str, float]
) -> Metric:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


def _stamp(recipient: Recipient, handled: float) -> None:
    """A publish's first recipient times its write, if it is a live connection's outbox."""
    if isinstance(recipient, Outbox):
        recipient.stamp(handled)
