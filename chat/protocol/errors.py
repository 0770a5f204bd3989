"""Errors that carry the code the wire shows.

Each error names its wire code where it is raised, next to the spec clause that
demands it; the edges (HTTP reply, STOMP ERROR + close, CLI exit 2) only
translate. Pure module: imported by the sans-IO core and by both shells.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class CloseCode(IntEnum):
    """WebSocket close codes we send (RFC 6455 §7.4.1, PROTOCOL.md §6)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect elsewhere
    PROTOCOL_ERROR = 1002  # malformed STOMP frame or unknown command
    POLICY = 1008  # auth lost, forbidden destination, limits of policy
    TOO_BIG = 1009  # frame over the size limit
    SERVER_ERROR = 1011


class StompProtocolError(Exception):
    """A peer broke a STOMP rule: answer `ERROR` (`message` header, `detail` body), then close.

    The session never limps on after one of these (sticky failure).
    """

    close_code: ClassVar[CloseCode] = CloseCode.PROTOCOL_ERROR

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or message


class MalformedFrame(StompProtocolError):
    """Bytes that are not a STOMP 1.2 frame (STOMP 1.2 "Augmented BNF")."""


class UnknownCommand(StompProtocolError):
    """A command the STOMP 1.2 spec does not define for this direction."""


class MissingHeader(StompProtocolError):
    """A header the STOMP 1.2 spec requires for this command is absent."""


class FrameTooLarge(StompProtocolError):
    """A frame (or a header block) over the configured size limit."""

    close_code = CloseCode.TOO_BIG


class PolicyViolation(StompProtocolError):
    """Allowed by STOMP, refused by this server: destination, subscription limits, auth."""

    close_code = CloseCode.POLICY


class InvalidDestination(PolicyViolation):
    """A destination outside `/topic/NAME` (PROTOCOL.md §4), or a wildcard where none may be."""


class LocalProtocolError(Exception):
    """We tried to send what STOMP does not allow here (a bug in the caller, or a limit of ours).

    As h11's `LocalProtocolError`: the connection is unusable afterwards (sticky failure).
    """


class HttpRefusal(Exception):
    """A request refused with `status` and a JSON body `{"error": code, "detail": ...}`."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> list[tuple[str, str]]:
        """Extra response headers; RFC 6750 §3 asks 401 for a bearer token to say why."""
        if self.status == 401:
            return [("WWW-Authenticate", 'Bearer error="invalid_token"')]
        return []
