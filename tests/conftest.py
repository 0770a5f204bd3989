"""Shared fixtures: a PKI generated once per test session and real servers on loopback."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from chat import pki as pki_module
from chat.protocol.tokens import TokenAuthority, TokenPolicy
from chat.server.app import ChatServer
from chat.server.config import ServerConfig
from chat.store.keys import KeyStore

if TYPE_CHECKING:
    from tests.below_tls import BelowTls

CLIENTS = ("alice", "bob", "carol")


@dataclass(frozen=True)
class TestPki:
    __test__ = False  # a fixture value, not a test class
    dir: Path
    ca: Path
    foreign_dir: Path  # a second CA with its own client "mallory": must be refused

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def client_context(self, name: str) -> ssl.SSLContext:
        cert, key = self.client(name)
        return pki_module.client_ssl_context(cert, key, self.ca)

    def foreign_context(self) -> ssl.SSLContext:
        """A client whose certificate comes from another CA, trusting our server."""
        d = self.foreign_dir
        return pki_module.client_ssl_context(d / "mallory.crt", d / "mallory.key", self.ca)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    directory = tmp_path_factory.mktemp("pki")
    dev, _ = pki_module.ensure_dev_pki(directory, CLIENTS)
    foreign = tmp_path_factory.mktemp("foreign-pki")
    pki_module.ensure_dev_pki(foreign, ("mallory",))
    return TestPki(directory, dev.ca, foreign)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> TokenAuthority:
    """A token authority over its own key store, for plain-value tests of the session."""
    keys = KeyStore.open(tmp_path_factory.mktemp("keys") / "keys")
    return TokenAuthority(keys, TokenPolicy(lifetime=60, leeway=0))


@dataclass(frozen=True)
class RunningServer:
    server: ChatServer
    port: int
    stopped: trio.Event = field(default_factory=trio.Event, compare=False, repr=False)

    async def stop(self) -> None:
        """Shut down (1001 to every client) and wait until the server has let go of its state."""
        self.server.shutdown()
        with trio.fail_after(10):
            await self.stopped.wait()

    @property
    def config(self) -> ServerConfig:
        return self.server.config

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def start_server(pki: TestPki, tmp_path: Path, nursery: trio.Nursery) -> StartServer:
    """Start a server on an ephemeral port; keyword arguments override ServerConfig fields."""
    base = ServerConfig(host="127.0.0.1", port=0, certs_dir=pki.dir, state_dir=tmp_path / "state")

    async def start(**overrides: object) -> RunningServer:
        server = ChatServer(replace(base, **overrides))
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[int]) -> None:
            try:
                await server.run(task_status=task_status)
            finally:
                stopped.set()

        port = await nursery.start(run)
        return RunningServer(server, port, stopped)

    return start


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


async def token_for(server: RunningServer, pki: TestPki, name: str) -> str:
    reply = await http_request(server, pki.client_context(name), "POST", "/auth/token")
    assert reply.status == 200, reply
    return reply.json()["access_token"]


@asynccontextmanager
async def raw_ws(
    server: RunningServer,
    pki: TestPki,
    name: str,
    *,
    token: str | None = None,
    subprotocols: list[str] | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A bare trio-websocket connection, for tests that speak STOMP by hand."""
    token = token or await token_for(server, pki, name)
    offered = subprotocols if subprotocols is not None else ["v12.stomp", f"bearer.{token}"]
    async with open_websocket_url(
        server.ws_url, ssl_context=pki.client_context(name), subprotocols=offered
    ) as ws:
        yield ws


def json_body(body: bytes | bytearray) -> dict:
    return json.loads(bytes(body))


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


async def http_request(
    server: RunningServer,
    context: ssl.SSLContext,
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> HttpReply:
    """One raw HTTP/1.1 request over mTLS, parsed with h11, for tests that check headers."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=context)
    return await http_exchange(stream, method, path, headers, body)


async def http_exchange(
    stream: trio.abc.Stream,
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> HttpReply:
    """Send one request on `stream` (TLS, or a memory stream below it), read the answer with
    h11, close the stream."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    all_headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body))), *(headers or [])]
    await stream.send_all(
        conn.send(h11.Request(method=method, target=path, headers=all_headers))
        + conn.send(h11.Data(data=body))
        + conn.send(h11.EndOfMessage())
    )
    response: h11.Response | None = None
    data = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    await trio.aclose_forcefully(stream)
    assert response is not None
    reply_headers = {k.decode().lower(): v.decode() for k, v in response.headers}
    return HttpReply(response.status_code, reply_headers, bytes(data))


class StompPeer:
    """A hand-driven STOMP peer over a raw WebSocket: send frames, read parsed frames."""

    def __init__(self, ws: WebSocketConnection) -> None:
        from chat.protocol.stomp import SERVER_COMMANDS, FrameParser

        self.ws = ws
        self._parser = FrameParser(commands=SERVER_COMMANDS)
        self._pending: list = []

    async def send(
        self, command: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        from chat.protocol.stomp import Frame, encode

        frame = Frame(command, tuple((headers or {}).items()), body)
        data = encode(frame)
        try:
            await self.ws.send_message(data.decode())
        except UnicodeDecodeError:
            await self.ws.send_message(data)

    async def receive(self, timeout: float = 5):
        """The next frame (heart-beats skipped)."""
        with trio.fail_after(timeout):
            while not self._pending:
                message = await self.ws.get_message()
                data = message.encode() if isinstance(message, str) else message
                self._pending.extend(self._parser.feed(data))
        return self._pending.pop(0)

    async def connect(self, heartbeat: str = "0,0"):
        await self.send(
            "CONNECT", {"accept-version": "1.2", "host": "chat", "heart-beat": heartbeat}
        )
        frame = await self.receive()
        assert frame.command == "CONNECTED", frame
        return frame


@asynccontextmanager
async def stomp_peer(
    server: RunningServer, pki: TestPki, name: str, heartbeat: str = "0,0"
) -> AsyncIterator[StompPeer]:
    async with raw_ws(server, pki, name) as ws:
        peer = StompPeer(ws)
        await peer.connect(heartbeat)
        yield peer


# ---------------------------------------------------------------- below TLS (tests/below_tls.py)


@pytest.fixture
def start_below_tls(
    pki: TestPki, tmp_path: Path, nursery: trio.Nursery
) -> Callable[..., Awaitable[BelowTls]]:
    """Start the server below TLS (memory streams, MockClock, a wall clock that follows it);
    keyword arguments override ServerConfig fields. The test takes `autojump_clock` too:
    pytest-trio runs a test on a fixture's clock only when the test names it."""
    from tests import below_tls

    async def start(**overrides: object) -> BelowTls:
        return await below_tls.start_below_tls(pki, tmp_path / "state", nursery, **overrides)

    return start


@pytest.fixture
async def below_tls(start_below_tls: Callable[..., Awaitable[BelowTls]]) -> BelowTls:
    return await start_below_tls()
