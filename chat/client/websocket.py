"""trio-websocket as our client uses it, plus the two things it cannot tell us.

The WebSocket is trio-websocket's public API: `wrap_client_stream()` over a TLS stream we
open ourselves (`tls.open_tls_stream`, so an unreachable host or a refused server
certificate is named precisely), inside the connection's own nursery; then `subprotocol`,
`closed`, `get_message()`, `send_message()` and `aclose()`. What it lacks, isolated here:

- Why the transport broke. trio-websocket turns every transport failure into close code
  1006 without a cause, and, while the upgrade is unanswered, into a wait that never ends:
  its reader stops and nothing wakes `wrap_client_stream()`. With TLS 1.3 a server that
  refuses our client certificate is heard only then, at the first read. So `_Transport`
  wraps the TLS stream: until the upgrade is done, a failure is raised as the ClientError
  naming it, which ends trio-websocket's reader task and with it the nursery's wait; after,
  it is recorded (`WebSocketLink.broken`) and raised as the trio error trio-websocket expects.
- What a refusal said. Its reader raises `ConnectionRejected` into the nursery; we read its
  public `.status_code` and JSON `.body` into `TokenRefused` (PROTOCOL.md §2), or name a
  wrong path. Any other crash of its reader during the upgrade (h11 choking on the answer)
  means the server does not speak WebSocket.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

import trio
import trio_websocket
from trio_websocket import ConnectionRejected, WebSocketConnection

from chat.client.errors import (
    BadResponse,
    ClientError,
    ConnectionLost,
    ServerUnreachable,
    refusal,
    sole_exception,
)
from chat.client.tls import (
    Endpoint,
    ServerUrl,
    open_tls_stream,
    transport_failure,
    unanswered_failure,
)
from chat.protocol.wire import WS_PATH

MAX_WS_MESSAGE = 4 * 1024 * 1024  # a server may put many STOMP frames in one message


@dataclass(frozen=True, slots=True)
class WebSocketLink:
    """An open WebSocket and the nursery its reader runs in (the connection's own)."""

    ws: WebSocketConnection
    nursery: trio.Nursery
    _transport: _Transport

    @property
    def endpoint(self) -> Endpoint:
        return self._transport.endpoint

    @property
    def broken(self) -> ClientError | None:
        """Why the transport under the WebSocket failed, if it did (1006 says no more)."""
        return self._transport.failure

    async def abort(self) -> None:
        """Drop the connection without a close handshake: the peer is not answering."""
        await trio.aclose_forcefully(self._transport)


@asynccontextmanager
async def open_websocket(
    url: ServerUrl, ssl_context: ssl.SSLContext, subprotocols: list[str], timeout: float
) -> AsyncIterator[WebSocketLink]:
    """A WebSocket over mutual TLS to `url`, offering `subprotocols`, for the block.

    TCP, TLS and the upgrade each take at most `timeout`. Leaving cancels the nursery
    (close politely before that) and closes the stream. Raises `ClientError`s.
    """
    stream = await open_tls_stream(url.endpoint, ssl_context, timeout)
    async with websocket_over(stream, url, subprotocols, timeout) as link:
        yield link


@asynccontextmanager
async def websocket_over(
    stream: trio.abc.Stream, url: ServerUrl, subprotocols: list[str], timeout: float
) -> AsyncIterator[WebSocketLink]:
    """As `open_websocket()`, over a stream already open (TLS, or a test's memory stream)."""
    transport = _Transport(stream, url.endpoint)
    try:
        async with trio.open_nursery() as nursery:
            ws = await _upgrade(nursery, transport, url, subprotocols, timeout)
            try:
                yield WebSocketLink(ws, nursery, transport)
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # from the reader, the upgrade or the block
        leaf = sole_exception(group)
        if leaf is None:
            raise
        failure = _translate(leaf, transport, url)
        raise failure from (leaf if failure is not leaf else leaf.__cause__)
    finally:
        await trio.aclose_forcefully(transport)


async def _upgrade(
    nursery: trio.Nursery,
    transport: _Transport,
    url: ServerUrl,
    subprotocols: list[str],
    timeout: float,
) -> WebSocketConnection:
    with trio.move_on_after(timeout) as waited:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            transport,  # type: ignore[arg-type]  # documented: "an arbitrary stream"
            url.endpoint.host_header,
            url.path,
            subprotocols=subprotocols,
            max_message_size=MAX_WS_MESSAGE,
        )
    if waited.cancelled_caught:
        raise ServerUnreachable(
            f"{url.endpoint} did not complete the WebSocket handshake within {timeout:g} s"
        )
    transport.upgraded = True
    return ws


def _translate(leaf: BaseException, transport: _Transport, url: ServerUrl) -> BaseException:
    """What to raise for the one exception the nursery ended with."""
    if isinstance(leaf, ConnectionRejected):
        return _rejection(leaf, url)
    if transport.upgraded or not isinstance(leaf, Exception) or isinstance(leaf, ClientError):
        return leaf
    return BadResponse(
        f"{url.endpoint} does not speak WebSocket as expected ({type(leaf).__name__}: {leaf})"
    )


def _rejection(exc: ConnectionRejected, url: ServerUrl) -> ClientError:
    """A refused upgrade: TokenRefused with the JSON code (PROTOCOL.md §2's table), or, for
    a path the server does not serve, an error saying so (it has nothing to do with tokens)."""
    if exc.status_code == HTTPStatus.NOT_FOUND:
        right = f"{url.scheme}://{url.endpoint}{WS_PATH}"
        return BadResponse(
            f"{url} is not the chat's WebSocket endpoint (HTTP 404 for the path "
            f"{url.path!r}): the path is {WS_PATH}, as in {right}"
        )
    try:
        payload = json.loads(exc.body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    return refusal(exc.status_code, payload if isinstance(payload, dict) else {})


class _Transport(trio.abc.Stream):
    """The TLS stream under trio-websocket, keeping why it broke (see the module docstring)."""

    def __init__(self, stream: trio.abc.Stream, endpoint: Endpoint) -> None:
        self._stream = stream
        self.endpoint = endpoint
        self._answered = False  # has the server sent anything since the TLS handshake?
        self.upgraded = False  # set once trio-websocket has the server's 101
        self.failure: ClientError | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            self._broke(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self._broke(exc)
            raise
        if not data:
            self._broke(None)
        self._answered = True
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _broke(self, exc: trio.BrokenResourceError | None) -> None:
        """Record why (the first reason wins); before the upgrade, raise it (see above)."""
        if self.failure is None:
            self.failure = self._why(exc)
        if not self.upgraded:
            raise self.failure

    def _why(self, exc: trio.BrokenResourceError | None) -> ClientError:
        if not self._answered:
            return unanswered_failure(exc, self.endpoint)
        if exc is None:
            return ConnectionLost(f"{self.endpoint} closed the connection")
        return transport_failure(exc, self.endpoint, connected=True)
