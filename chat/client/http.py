"""Token requests over mutual TLS with h11, and the client's one transport-error boundary.

Every ssl, socket and trio transport error the client meets is translated here, once,
into a `ClientError` whose message says what failed and, for TLS, which side refused
what: `transport_failure()` serves this module's requests and `WatchedStream`, the
stream under the WebSocket connection in `connection.py`.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

HTTP_TIMEOUT = 10.0  # a token request is a few ms on a live server; beyond this it is not answering
MAX_RESPONSE_BYTES = 64 * 1024  # a token response is under 2 KiB; refuse to buffer a runaway body
RECEIVE_CHUNK = 16 * 1024  # one TLS record's worth
USER_AGENT = "chat-client/0.1"
DEFAULT_PORTS = {"https": 443, "wss": 443}
HTTP_SCHEMES = frozenset({"https"})
WS_SCHEMES = frozenset({"wss"})

# OpenSSL verify codes (x509_vfy.h) for a server certificate we refuse.
_SERVER_CERT_PROBLEMS = {
    9: "the server's certificate is not valid yet",
    10: "the server's certificate has expired",
    18: "the server's certificate is self-signed, not signed by our CA",
    19: "the server's certificate is not signed by our CA",
    20: "the server's certificate is not signed by our CA",
    21: "the server's certificate is not signed by our CA",
    23: "the server's certificate is revoked",
}
_HOSTNAME_MISMATCH = 62
# TLS alerts (RFC 8446 §6.2) a server sends when it refuses our client certificate.
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires one and got none",
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by a CA the server trusts",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}


class ClientError(Exception):
    """A failure the client reports to a human in one line (the CLI prints it and exits 2)."""


class ServerUnreachable(ClientError):
    """No connection: refused, unresolvable host, network down, or no answer in time."""


class TlsFailure(ClientError):
    """The TLS handshake failed; `rejected_by_server` tells whose check refused it."""

    def __init__(self, message: str, *, rejected_by_server: bool) -> None:
        super().__init__(message)
        self.rejected_by_server = rejected_by_server


class SilentRefusal(TlsFailure):
    """The server hung up around the TLS handshake without a word (see `silent_refusal()`).

    Most likely it refused our certificate, but a server shutting down looks the same.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, rejected_by_server=True)


class TokenRefused(ClientError):
    """The server refused a token request or a WebSocket handshake (status + JSON code)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        shown = f"{code}: {detail}" if detail else code
        super().__init__(f"the server refused our token (HTTP {status} {shown})")
        self.status = status
        self.code = code
        self.detail = detail


class BadResponse(ClientError):
    """The server answered something the protocol does not allow."""


class ConnectionLost(ClientError):
    """An established connection ended: closed by the server, dropped, or gone silent.

    `code` is the WebSocket close code when the server sent one (PROTOCOL.md §6).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def host_header(self) -> str:
        """RFC 9110 §7.2: host[:port], the port omitted when it is the scheme's default."""
        return str(self) if self.port != 443 else str(self).rsplit(":", 1)[0]


@dataclass(frozen=True, slots=True)
class ServerUrl:
    scheme: str
    endpoint: Endpoint
    path: str


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What POST /auth/token and /auth/refresh return (PROTOCOL.md §1, §7)."""

    access_token: str = field(repr=False)
    expires_in: int
    refresh_token: str | None = field(repr=False)


def parse_url(url: str, schemes: frozenset[str]) -> ServerUrl:
    """Split a server URL, refusing schemes we do not speak (we never talk without TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        wanted = " or ".join(f"{scheme}://HOST:PORT" for scheme in sorted(schemes))
        raise ClientError(f"invalid server URL {url!r}: expected {wanted}")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ClientError(f"invalid port in server URL {url!r}") from None
    return ServerUrl(parts.scheme, Endpoint(parts.hostname, port), parts.path or "/")


# ---------------------------------------------------------------- the transport boundary


def transport_failure(exc: BaseException, endpoint: Endpoint, *, connected: bool) -> ClientError:
    """The ClientError for a transport exception (`connected`: TCP was up when it happened)."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLError):
        return _tls_failure(cause, endpoint)
    if isinstance(exc, trio.TooSlowError):
        return ServerUnreachable(f"cannot reach {endpoint}: timed out")
    reason = _os_reason(cause) if isinstance(cause, OSError) else "the connection broke"
    if connected:
        return ConnectionLost(f"connection to {endpoint} lost: {reason}")
    return ServerUnreachable(f"cannot reach {endpoint}: {reason}")


@contextmanager
def mapped_transport_errors(endpoint: Endpoint, *, connected: bool) -> Iterator[None]:
    """Translate transport exceptions raised inside the block with `transport_failure()`."""
    try:
        yield
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        raise transport_failure(exc, endpoint, connected=connected) from exc


def _tls_failure(exc: ssl.SSLError, endpoint: Endpoint) -> TlsFailure:
    prefix = f"TLS handshake with {endpoint} failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == _HOSTNAME_MISMATCH:
            problem = f"the server's certificate is not valid for the host name {endpoint.host}"
        else:
            problem = _SERVER_CERT_PROBLEMS.get(
                exc.verify_code, f"we refused the server's certificate ({exc.verify_message})"
            )
        return TlsFailure(f"{prefix}: {problem}", rejected_by_server=False)
    why = _CLIENT_CERT_ALERTS.get(exc.reason or "")
    if why is not None:
        message = f"{prefix}: the server rejected our client certificate ({why})"
        return TlsFailure(message, rejected_by_server=True)
    if isinstance(exc, ssl.SSLEOFError):
        return silent_refusal(endpoint)
    return TlsFailure(f"{prefix}: {exc.reason or exc}", rejected_by_server=False)


def silent_refusal(endpoint: Endpoint) -> SilentRefusal:
    """The server hung up during or right after the handshake without a word.

    A server built on trio (like ours) drops the TLS alert when it refuses a client
    certificate, and with TLS 1.3 the client's side of the handshake has already
    finished by then: a close before any answer is the only sign we get.
    """
    return SilentRefusal(
        f"TLS handshake with {endpoint} failed: the server closed the connection without "
        "answering; it most likely rejected our client certificate"
    )


def _os_reason(exc: OSError) -> str:
    """The most specific reason: trio reports a failed connect as an OSError caused by a group."""
    group = exc.__cause__
    if isinstance(group, ExceptionGroup) and group.exceptions:
        first = group.exceptions[0]
        if isinstance(first, OSError):
            exc = first
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


async def open_tls_stream(
    endpoint: Endpoint, ssl_context: ssl.SSLContext, timeout: float = HTTP_TIMEOUT
) -> trio.SSLStream[trio.SocketStream]:
    """TCP connect and a completed TLS handshake, errors translated, under `timeout`."""
    with mapped_transport_errors(endpoint, connected=False), trio.fail_after(timeout):
        tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=endpoint.host, https_compatible=True)
    try:
        with mapped_transport_errors(endpoint, connected=True), trio.fail_after(timeout):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


class WatchedStream(trio.abc.Stream):
    """A TLS stream, watched: when bytes last moved (for heart-beats), and how it broke.

    The WebSocket layer (trio-websocket) swallows transport errors; recording them here keeps
    the precise reason (a TLS alert, a reset) and lets a handshake notice a stream that died
    under it (`broken`).
    """

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], endpoint: Endpoint) -> None:
        self._stream = stream
        self._endpoint = endpoint
        self.last_received = self.last_sent = trio.current_time()
        self.failure: ClientError | None = None
        self.broken = trio.Event()
        self._answered = False  # has the server sent anything since the TLS handshake?

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            self.fail(
                transport_failure(exc, self._endpoint, connected=True)
                if self._answered
                else silent_refusal(self._endpoint)
            )
            raise
        self.last_sent = trio.current_time()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self.fail(
                transport_failure(exc, self._endpoint, connected=True)
                if self._answered
                else silent_refusal(self._endpoint)
            )
            raise
        if not data:
            self.fail(
                ConnectionLost(f"{self._endpoint} closed the connection")
                if self._answered
                else silent_refusal(self._endpoint)
            )
        self._answered = True
        self.last_received = trio.current_time()
        return data

    async def aclose(self) -> None:
        self.broken.set()  # whoever waits on this stream learns it is gone
        await self._stream.aclose()

    def fail(self, failure: ClientError) -> None:
        """Record why the stream is unusable (the first reason wins) and wake its watchers."""
        if self.failure is None:
            self.failure = failure
        self.broken.set()



# ---------------------------------------------------------------- JSON requests


async def request_json(
    base_url: str,
    method: str,
    path: str,
    ssl_context: ssl.SSLContext,
    body: dict[str, Any] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request with an optional JSON body; returns (status, JSON object answer).

    A non-JSON answer is `{}` for an error status and `BadResponse` for a success.
    """
    url = parse_url(base_url, HTTP_SCHEMES)
    payload = b"" if body is None else json.dumps(body).encode()
    stream = await open_tls_stream(url.endpoint, ssl_context, timeout)
    try:
        with mapped_transport_errors(url.endpoint, connected=True), trio.fail_after(timeout):
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(_request_bytes(conn, url, method, path, payload))
            status, data = await _read_response(stream, conn, url.endpoint)
    finally:
        await trio.aclose_forcefully(stream)
    return status, _json_object(status, data, url.endpoint)


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
    stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection, endpoint: Endpoint
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
            except trio.BrokenResourceError:
                if status == 0:  # reset before any answer: a refusal, as a bare EOF is
                    raise silent_refusal(endpoint) from None
                raise
            if not data and conn.their_state is h11.SEND_RESPONSE and status == 0:
                raise silent_refusal(endpoint)
            conn.receive_data(data)
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


async def fetch_token(base_url: str, ssl_context: ssl.SSLContext) -> TokenGrant:
    """POST /auth/token: an access token for the identity of our client certificate."""
    return _grant(*await request_json(base_url, "POST", "/auth/token", ssl_context))


async def refresh_token(
    base_url: str, ssl_context: ssl.SSLContext, refresh_token: str
) -> TokenGrant:
    """POST /auth/refresh: a new pair; the refresh token given is spent (PROTOCOL.md §7)."""
    body = {"refresh_token": refresh_token}
    return _grant(*await request_json(base_url, "POST", "/auth/refresh", ssl_context, body))


def _grant(status: int, payload: dict[str, Any]) -> TokenGrant:
    if status != 200:
        raise refusal(status, payload)
    access, expires = payload.get("access_token"), payload.get("expires_in")
    refresh = payload.get("refresh_token")
    if not isinstance(access, str) or not isinstance(expires, int) or isinstance(expires, bool):
        raise BadResponse("the token response lacks access_token or expires_in")
    return TokenGrant(access, expires, refresh if isinstance(refresh, str) else None)


def refusal(status: int, payload: dict[str, Any]) -> TokenRefused:
    """TokenRefused from a refusal's JSON body `{"error": CODE, "detail": ...}`."""
    code, detail = payload.get("error"), payload.get("detail")
    return TokenRefused(
        status,
        code if isinstance(code, str) else f"http_{status}",
        detail if isinstance(detail, str) else "",
    )
