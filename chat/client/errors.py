"""What can go wrong for a client, one type per cause, each a line a human can act on.

Every failure the client library raises is a `ClientError` (the CLI prints it and exits 2).
Transport errors are translated once, in `chat.client.tls`; refusals carry the server's
status and JSON code (PROTOCOL.md §2, §7); STOMP ERROR frames carry `message` and body.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from chat.protocol import events


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
    """The server hung up around the TLS handshake without a word (see `tls.silent_refusal()`).

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


class ServerBusy(TokenRefused):
    """Refused for now, not for good (HTTP 503: the server's storage is busy): worth a retry."""


class BadResponse(ClientError):
    """The server answered something the protocol does not allow."""


class ConnectionLost(ClientError):
    """An established connection ended: closed by the server, dropped, or gone silent.

    `code` is the WebSocket close code when the server sent one (PROTOCOL.md §6).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StompError(ClientError):
    """The server sent ERROR (`message` header, `detail` body); the connection is over."""

    def __init__(self, message: str, detail: str = "") -> None:
        first_line = detail.strip().splitlines()[0] if detail.strip() else ""
        shown = f"{message}: {first_line}" if first_line and first_line != message else message
        super().__init__(f"the server sent ERROR: {shown}")
        self.message = message
        self.detail = detail

    @classmethod
    def of(cls, error: events.Error) -> StompError:
        return cls(error.message, error.detail)


class ServerProtocolError(ConnectionLost):
    """The server sent bytes that are not STOMP 1.2 as PROTOCOL.md describes; we closed 1002."""


class FellBehind(ConnectionLost):
    """Too many received messages were waiting for receive(); we closed rather than grow."""


class ReceiptTimeout(ClientError):
    """No RECEIPT in time; the frame may or may not have been acted on."""


def sole_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception a nursery wrapped, if it wrapped exactly one (to raise it as is)."""
    return group.exceptions[0] if len(group.exceptions) == 1 else None


def refusal(status: int, payload: dict[str, Any]) -> TokenRefused:
    """TokenRefused from a refusal's JSON body `{"error": CODE, "detail": ...}`."""
    code, detail = payload.get("error"), payload.get("detail")
    kind = ServerBusy if status == HTTPStatus.SERVICE_UNAVAILABLE else TokenRefused
    return kind(
        status,
        code if isinstance(code, str) else f"http_{status}",
        detail if isinstance(detail, str) else "",
    )
