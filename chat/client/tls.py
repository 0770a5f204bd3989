"""Server URLs, TCP + TLS connections, and the client's one transport-error boundary.

Every ssl, socket and trio transport error the client meets is translated here, once, into
a `ClientError` whose message says what failed and, for TLS, which side refused what.
Token requests (`http.py`) and the WebSocket (`websocket.py`) both connect through here.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from chat.client.errors import (
    ClientError,
    ConnectionLost,
    ServerUnreachable,
    SilentRefusal,
    TlsFailure,
)

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

    def __str__(self) -> str:
        return f"{self.scheme}://{self.endpoint}{self.path}"


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


async def open_tls_stream(
    endpoint: Endpoint, ssl_context: ssl.SSLContext, timeout: float
) -> trio.SSLStream[trio.SocketStream]:
    """TCP connect and a completed TLS handshake, errors translated, each under `timeout`."""
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


@contextmanager
def mapped_transport_errors(endpoint: Endpoint, *, connected: bool) -> Iterator[None]:
    """Translate transport exceptions raised inside the block with `transport_failure()`."""
    try:
        yield
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        raise transport_failure(exc, endpoint, connected=connected) from exc


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


def unanswered_failure(exc: BaseException | None, endpoint: Endpoint) -> ClientError:
    """Why a fresh TLS connection broke before the server answered anything (`exc`: what
    the read or write raised; None for an orderly close). A TLS alert names its cause;
    anything else is a silent refusal."""
    if exc is not None and isinstance(exc.__cause__, ssl.SSLError):
        return transport_failure(exc, endpoint, connected=True)
    return silent_refusal(endpoint)


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
