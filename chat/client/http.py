"""Token requests (PROTOCOL.md §1, §7): one HTTP/1.1 request over mutual TLS, with h11.

`fetch_token()` and `refresh_token()` are the client's way to an access token; transport
errors are translated by `chat.client.tls`, refusals carry the server's status and code.
Each takes the `Dial` that reaches the server: TCP + TLS (`open_tls_stream`) unless a test
hands in the far end of a memory stream (tests/below_tls.py).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from chat.client.errors import (
    BadResponse,
    refusal,
)
from chat.client.tls import (
    HTTP_SCHEMES,
    Endpoint,
    ServerUrl,
    mapped_transport_errors,
    open_tls_stream,
    parse_url,
    unanswered_failure,
)

__all__ = [
    # the token API
    "HTTP_TIMEOUT",
    "Dial",
    "TokenGrant",
    "fetch_token",
    "refresh_token",
    "request",
    "request_json",
]

HTTP_TIMEOUT = 10.0  # a token request is a few ms on a live server; beyond this it is not answering
MAX_RESPONSE_BYTES = 64 * 1024  # a token response is under 2 KiB; refuse to buffer a runaway body
RECEIVE_CHUNK = 16 * 1024  # one TLS record's worth
USER_AGENT = "chat-client/0.1"

Dial = Callable[[Endpoint, ssl.SSLContext, float], Awaitable[trio.abc.Stream]]
"""How a request reaches the server: (endpoint, context, timeout) to an open stream."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What POST /auth/token and /auth/refresh return (PROTOCOL.md §1, §7)."""

    access_token: str = field(repr=False)
    expires_in: int
    refresh_token: str | None = field(repr=False)


async def request_json(
    base_url: str,
    method: str,
    path: str,
    ssl_context: ssl.SSLContext,
    body: dict[str, Any] | None = None,
    timeout: float = HTTP_TIMEOUT,
    dial: Dial = open_tls_stream,
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request with an optional JSON body; returns (status, JSON object answer).

    A non-JSON answer is `{}` for an error status and `BadResponse` for a success.
    """
    status, data = await request(base_url, method, path, ssl_context, body, timeout, dial)
    return status, _json_object(status, data, parse_url(base_url, HTTP_SCHEMES).endpoint)


async def request(
    base_url: str,
    method: str,
    path: str,
    ssl_context: ssl.SSLContext,
    body: dict[str, Any] | None = None,
    timeout: float = HTTP_TIMEOUT,
    dial: Dial = open_tls_stream,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request with an optional JSON body; returns (status, body of the answer)."""
    url = parse_url(base_url, HTTP_SCHEMES)
    payload = b"" if body is None else json.dumps(body).encode()
    stream = await dial(url.endpoint, ssl_context, timeout)
    try:
        with mapped_transport_errors(url.endpoint, connected=True), trio.fail_after(timeout):
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(_request_bytes(conn, url, method, path, payload))
            return await _read_response(stream, conn, url.endpoint)
    finally:
        await trio.aclose_forcefully(stream)


def _request_bytes(
    conn: h11.Connection, url: ServerUrl, method: str, path: str, payload: bytes
) -> bytes:
    headers = [
        ("Host", url.endpoint.host_header),
        ("User-Agent", USER_AGENT),
        ("Accept", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Connection", "close"),
    ]
    if payload:
        headers.append(("Content-Type", "application/json"))
    events = [
        h11.Request(method=method, target=path, headers=headers),
        h11.Data(data=payload),
        h11.EndOfMessage(),
    ]
    return b"".join(conn.send(event) or b"" for event in events)


async def _read_response(
    stream: trio.abc.Stream, conn: h11.Connection, endpoint: Endpoint
) -> tuple[int, bytes]:
    """Read the answer to the request `conn` sent: (status, body)."""
    status, body = 0, bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadResponse(f"the server sent malformed HTTP: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(RECEIVE_CHUNK)
            except trio.BrokenResourceError as exc:
                if status == 0:  # broken before any answer: a refusal, as a bare EOF is
                    raise unanswered_failure(exc, endpoint) from None
                raise
            if not data and conn.their_state is h11.SEND_RESPONSE and status == 0:
                raise unanswered_failure(None, endpoint)
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_RESPONSE_BYTES:
                raise BadResponse(f"the server's answer is over {MAX_RESPONSE_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise BadResponse(f"{endpoint} closed the connection in the middle of its answer")


def _json_object(status: int, data: bytes, endpoint: Endpoint) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    if isinstance(payload, dict):
        return payload
    if status >= 400:
        return {}
    raise BadResponse(f"{endpoint} answered HTTP {status} without a JSON object")


# ---------------------------------------------------------------- tokens


async def fetch_token(
    base_url: str, ssl_context: ssl.SSLContext, *, dial: Dial = open_tls_stream
) -> TokenGrant:
    """POST /auth/token: an access token for the identity of our client certificate."""
    return _grant(*await request_json(base_url, "POST", "/auth/token", ssl_context, dial=dial))


async def refresh_token(
    base_url: str, ssl_context: ssl.SSLContext, refresh_token: str, *, dial: Dial = open_tls_stream
) -> TokenGrant:
    """POST /auth/refresh: a new pair; the refresh token given is spent (PROTOCOL.md §7)."""
    body = {"refresh_token": refresh_token}
    answer = await request_json(base_url, "POST", "/auth/refresh", ssl_context, body, dial=dial)
    return _grant(*answer)


def _grant(status: int, payload: dict[str, Any]) -> TokenGrant:
    if status != 200:
        raise refusal(status, payload)
    access, expires = payload.get("access_token"), payload.get("expires_in")
    refresh = payload.get("refresh_token")
    if not isinstance(access, str) or not isinstance(expires, int) or isinstance(expires, bool):
        raise BadResponse("the token response lacks access_token or expires_in")
    return TokenGrant(access, expires, refresh if isinstance(refresh, str) else None)
