"""The real server below TLS: memory streams, trio's MockClock, and a wall clock that follows it.

`ChatServer.serve_stream` is what follows the TLS handshake; here it is handed one end of a
`trio.testing.memory_stream_pair` and the `Peer` a handshake with the client's certificate
would have established. The server's wall clock is `BASE + trio.current_time()`, so under
`MockClock(autojump_threshold=0)` (pytest-trio's `autojump_clock`) tokens expire, heart-beats
fall due and guards tick at exact instants, at no cost in real time.

Storage runs on the event loop (`InlineLane`): a worker thread would leave the event loop
idle, and the autojump would then run the mock clock ahead (hundreds of seconds) while the
thread works. Everything else (SQLite state and keys in a temporary directory, wsproto, h11,
the broker, the committer) is the production code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar, TypeVarTuple

import trio
import trio.testing
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from trio_websocket import WebSocketConnection

from chat import pki as pki_module
from chat.client.connection import StompClient, stomp_over
from chat.client.http import Dial, TokenGrant
from chat.client.tls import Endpoint, ServerUrl
from chat.client.websocket import websocket_over
from chat.protocol.wire import WS_PATH
from chat.server.app import ChatServer
from chat.server.config import ServerConfig
from chat.server.http_api import Peer
from chat.server.storage import Lane
from tests.conftest import HttpReply, StompPeer, TestPki, http_exchange

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

BASE = 1_800_000_000.0  # the server's wall clock when it starts
URL = ServerUrl("wss", Endpoint("chat.test", 443), WS_PATH)
BASE_URL = "https://chat.test"  # the token endpoints, as `server_urls()` derives them
TIMEOUT = 10.0
StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


class InlineLane(Lane):
    """Runs each storage call on the event loop (see the module docstring for why)."""

    async def run_blocking(self, call: Callable[[*Ts], T], *args: *Ts) -> T:
        return call(*args)


def wall_clock() -> Callable[[], float]:
    """A wall clock reading BASE now and advancing with trio's clock."""
    start = trio.current_time()
    return lambda: BASE + (trio.current_time() - start)


@dataclass
class BelowTls:
    """A running server whose connections are memory streams; one per test."""

    server: ChatServer
    pki: TestPki
    handlers: trio.Nursery

    @property
    def config(self) -> ServerConfig:
        return self.server.config

    def peer(self, name: str) -> Peer:
        """What the TLS handshake with `name`'s certificate establishes."""
        cert = x509.load_pem_x509_certificate(self.pki.client(name)[0].read_bytes())
        return Peer(
            pki_module.identity_of(cert), pki_module.thumbprint(cert.public_bytes(Encoding.DER))
        )

    def open_stream(
        self, name: str, pair: StreamPair = trio.testing.memory_stream_pair
    ) -> trio.abc.Stream:
        """A connection from `name`, its TLS handshake done; returns the client's end."""
        ours, theirs = pair()
        self.handlers.start_soon(self.server.serve_stream, theirs, self.peer(name))
        return ours

    def dial(self, name: str) -> Dial:
        """The client's way to the server (`TokenSource(dial=...)`): a connection from `name`,
        whatever certificate the SSL context holds."""

        async def dial(endpoint: Endpoint, context: object, timeout: float) -> trio.abc.Stream:
            return self.open_stream(name)

        return dial

    async def http(
        self,
        name: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> HttpReply:
        """One HTTP/1.1 request from `name`, parsed with h11."""
        return await http_exchange(self.open_stream(name), method, path, headers, body)

    async def grant(self, name: str) -> TokenGrant:
        """POST /auth/token as `name`."""
        reply = await self.http(name, "POST", "/auth/token")
        assert reply.status == 200, reply
        answer = reply.json()
        return TokenGrant(answer["access_token"], answer["expires_in"], answer["refresh_token"])

    async def token(self, name: str) -> str:
        return (await self.grant(name)).access_token

    @asynccontextmanager
    async def raw_ws(
        self,
        name: str,
        *,
        token: str | None = None,
        subprotocols: list[str] | None = None,
        pair: StreamPair = trio.testing.memory_stream_pair,
    ) -> AsyncIterator[WebSocketConnection]:
        """A bare trio-websocket connection, as conftest's `raw_ws`, below TLS."""
        token = token or await self.token(name)
        offered = subprotocols if subprotocols is not None else ["v12.stomp", f"bearer.{token}"]
        stream = self.open_stream(name, pair)
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, "chat.test", WS_PATH, subprotocols=offered
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(1):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def stomp_peer(
        self,
        name: str,
        heartbeat: str = "0,0",
        *,
        token: str | None = None,
        pair: StreamPair = trio.testing.memory_stream_pair,
    ) -> AsyncIterator[StompPeer]:
        """A connected hand-driven STOMP peer, as conftest's `stomp_peer`, below TLS."""
        async with self.raw_ws(name, token=token, pair=pair) as ws:
            peer = StompPeer(ws)
            await peer.connect(heartbeat)
            yield peer

    @asynccontextmanager
    async def client(
        self, name: str, heartbeat: tuple[int, int] = (0, 0), *, token: str | None = None
    ) -> AsyncIterator[StompClient]:
        """The client library's StompClient (the shell seam test_client_shell.py uses)."""
        token = token or await self.token(name)
        offer = ["v12.stomp", f"bearer.{token}"]
        async with (
            websocket_over(self.open_stream(name), URL, offer, TIMEOUT) as link,
            stomp_over(link, "chat", heartbeat) as client,
        ):
            yield client


async def start_below_tls(
    pki: TestPki, state_dir: Path, nursery: trio.Nursery, **overrides: object
) -> BelowTls:
    """A server below TLS on the mock clock, serving until `nursery` ends; keyword arguments
    override ServerConfig fields (conftest's `start_below_tls` fixture)."""
    assert isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock), (
        "a test below TLS takes pytest-trio's autojump_clock fixture as an argument"
    )
    base = ServerConfig(host="127.0.0.1", port=0, certs_dir=pki.dir, state_dir=state_dir)
    server = ChatServer(replace(base, **overrides), clock=wall_clock(), lane=InlineLane)
    handlers: list[trio.Nursery] = []
    ready = trio.Event()

    async def accept(nursery: trio.Nursery) -> None:  # connections come from open_stream
        handlers.append(nursery)
        ready.set()

    nursery.start_soon(server.serve, accept)
    await ready.wait()
    return BelowTls(server, pki, handlers[0])
