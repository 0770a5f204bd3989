"""The floor of our stack: trio + mutual TLS + wsproto fan-out with none of our logic.

It accepts WebSocket connections over the same TLS setup as chat-server (the same
`chat.pki.server_ssl_context`: TLS >= 1.2, client certificate required) and forwards every
message it receives to every *other* open connection. Like the real server, each forwarded
message is framed once (wsproto's `FrameProtocol`, unmasked, shared bytes) and appended
to each recipient's bytearray buffer, which that connection's writer task drains with one
`send_all` per wake-up. What it does not do, so that chat-server's cost above it is ours:
no HTTP routing beyond the upgrade, no token, no STOMP parsing or framing, no topics or
subscriptions, no heart-beats, no history.

Limits (it is a measuring stick, not a server):
- every message goes to everyone else: no topics, so use one publisher
  (`chat-load --raw --publishers 1 --topics 1`);
- a connection whose unsent bytes exceed BUFFER_LIMIT is dropped (as a slow consumer);
- the upgrade must arrive within HANDSHAKE_TIMEOUT of the TCP accept; nothing else on the
  peer is timed (no idle timeout, no ping);
- no graceful shutdown: SIGINT/SIGTERM end the process at once.

Usage: python benchmarks/baseline_server.py --port 9443 --certs-dir DIR
(DIR holds server.crt, server.key and ca.crt, as made by chat-certs or chat-server.)
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import RemoteProtocolError

from chat import pki

RECEIVE_BYTES = 64 * 1024  # one read from the TLS stream, as chat-server
BUFFER_LIMIT = 4 * 1024 * 1024  # unsent bytes per connection, as chat-server's default
HANDSHAKE_TIMEOUT = 10.0  # TLS handshake + upgrade request
_FRAMER = FrameProtocol(client=False, extensions=[])  # whole unmasked messages: stateless
_ENDINGS = (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError)


class Peer:
    """One connection's outbound side: a byte buffer and the event its writer waits on."""

    __slots__ = ("buffer", "ready", "overflowed")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ready = trio.Event()
        self.overflowed = False

    def push(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > BUFFER_LIMIT:
            self.overflowed = True
        self.ready.set()


class Hub:
    """Every open connection; a received message is framed once and queued to the others."""

    def __init__(self) -> None:
        self.peers: set[Peer] = set()

    def forward(self, sender: Peer, payload: str | bytes) -> None:
        frame = bytes(_FRAMER.send_data(payload, fin=True))
        for peer in self.peers:
            if peer is not sender:
                peer.push(frame)


async def handle(hub: Hub, stream: trio.SSLStream) -> None:
    """One connection: handshake, then a reader (this task) and a writer, until either ends."""
    ws = WSConnection(ConnectionType.SERVER)
    peer = Peer()
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
            await _upgrade(stream, ws)
        hub.peers.add(peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_writer, stream, peer, nursery.cancel_scope)
            with _connection_errors():
                await _reader(stream, ws, peer, hub)
            nursery.cancel_scope.cancel()
    except (*_ENDINGS, trio.TooSlowError):
        pass  # this connection is over; nothing else is disturbed
    finally:
        hub.peers.discard(peer)
        await trio.aclose_forcefully(stream)


@contextmanager
def _connection_errors() -> Iterator[None]:
    """Inside the nursery, end quietly: an escaping error would come out as a group."""
    with suppress(*_ENDINGS):
        yield


async def _upgrade(stream: trio.SSLStream, ws: WSConnection) -> None:
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise trio.BrokenResourceError("closed before the upgrade")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection()))
                return


async def _reader(stream: trio.SSLStream, ws: WSConnection, peer: Peer, hub: Hub) -> None:
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return
        ws.receive_data(data)
        for event in ws.events():
            if _act(event, ws, peer, hub):
                return


def _act(event: Event, ws: WSConnection, peer: Peer, hub: Hub) -> bool:
    """Handle one event; True when the connection is closing."""
    if isinstance(event, TextMessage | BytesMessage):
        if event.message_finished:  # our clients send whole messages; a fragment is dropped
            hub.forward(peer, event.data)
    elif isinstance(event, Ping):
        peer.push(ws.send(event.response()))
    elif isinstance(event, CloseConnection):
        peer.push(ws.send(event.response()))
        return True
    return False


async def _writer(stream: trio.SSLStream, peer: Peer, scope: trio.CancelScope) -> None:
    with _connection_errors():
        while not peer.overflowed:  # a slow consumer is dropped
            await peer.ready.wait()
            peer.ready = trio.Event()
            data, peer.buffer = peer.buffer, bytearray()
            await stream.send_all(data)
    scope.cancel()


async def serve(port: int, certs_dir: Path, host: str) -> None:
    context = pki.server_ssl_context(
        certs_dir / pki.SERVER_CERT, certs_dir / pki.SERVER_KEY, certs_dir / pki.CA_CERT
    )
    listeners = await trio.open_ssl_over_tcp_listeners(
        port, context, host=host, https_compatible=True
    )
    print(f"baseline: listening on wss://{host}:{port}/", file=sys.stderr, flush=True)
    await trio.serve_listeners(partial(handle, Hub()), listeners)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9443)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--certs-dir", type=Path, default=Path("certs"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die at once: nothing to flush
    with suppress(KeyboardInterrupt):
        trio.run(serve, args.port, args.certs_dir, args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
