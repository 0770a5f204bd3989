"""Deciding a WebSocket upgrade (PROTOCOL.md §2) as pure code: headers and certificate in.

The token travels as a `bearer.<JWT>` entry of `Sec-WebSocket-Protocol` because the
browser WebSocket API cannot set `Authorization`. It is never echoed: the answer names
only the chosen STOMP version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import h11

from chat.protocol.errors import HttpRefusal
from chat.protocol.tokens import (
    Claims,
    InvalidToken,
    MissingToken,
    TokenAuthority,
    TokenRevoked,
    check_binding,
)
from chat.protocol.wire import BEARER_PREFIX, STOMP_SUBPROTOCOLS
from chat.server.http_api import Peer, Request


class UnsupportedSubprotocol(HttpRefusal):
    status = 400
    code = "unsupported_subprotocol"


class BadHandshake(HttpRefusal):
    """The request is not a valid RFC 6455 opening handshake."""

    status = 400
    code = "bad_handshake"


class TooManyConnections(HttpRefusal):
    """PROTOCOL.md §12: an identity holds `--max-connections-per-identity` already."""

    status = 429
    code = "too_many_connections"


class IdentitySlots:
    """WebSocket connections per identity, so one identity cannot take the whole server."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()

    def take(self, identity: str) -> None:
        """Count one more connection of `identity`, or refuse it with TooManyConnections."""
        if self._held[identity] >= self.limit:
            raise TooManyConnections(
                f"{identity} already holds {self.limit} connections; close one first"
            )
        self._held[identity] += 1

    def give_back(self, identity: str) -> None:
        self._held[identity] -= 1
        if not self._held[identity]:
            del self._held[identity]


@dataclass(frozen=True, slots=True)
class Upgrade:
    """An authorized upgrade: the subprotocol to answer with and the token's claims."""

    subprotocol: str
    claims: Claims


# wsproto decodes these handshake headers itself, as ASCII tokens and the host as IDNA, and
# raises UnicodeError (not its RemoteProtocolError) on what it cannot decode.
_TOKEN_HEADERS = ("connection", "upgrade", "sec-websocket-extensions", "sec-websocket-protocol")


def check_handshake(request: Request) -> None:
    """Refuse a handshake wsproto could not take: headers it cannot decode as RFC 6455 needs
    them, or a request it cannot rebuild as HTTP/1.1 (an HTTP/1.0 one without Host, say);
    wsproto raises UnicodeError or h11's LocalProtocolError for those, not a refusal."""
    headers = []
    for name, value in request.headers:
        try:
            if name in _TOKEN_HEADERS:
                value.encode("ascii")
            elif name == "host":
                value.encode("latin-1").decode("idna")
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        except UnicodeError as exc:
            raise BadHandshake(f"the {name} header cannot be decoded") from exc
    try:  # what wsproto's initiate_upgrade_connection builds first
        h11.Request(method="GET", target=request.path.encode("ascii"), headers=headers)
    except (h11.LocalProtocolError, UnicodeError) as exc:
        raise BadHandshake(f"not a valid HTTP/1.1 request: {exc}") from exc


def is_upgrade(request: Request) -> bool:
    upgrade = request.header("upgrade") or ""
    return request.method == "GET" and "websocket" in upgrade.lower()


def offered_subprotocols(request: Request) -> list[str]:
    value = request.header("sec-websocket-protocol") or ""
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def authorize(
    request: Request,
    peer: Peer,
    authority: TokenAuthority,
    is_revoked: Callable[[Claims], bool],
    now: float,
) -> Upgrade:
    """Check the handshake's headers can be decoded, then token, binding, revocation and
    subprotocol, in the order of the refusal table."""
    check_handshake(request)
    offered = offered_subprotocols(request)
    claims = authority.verify(_bearer_token(offered), now)
    check_binding(claims, peer.identity, peer.x5t)
    if is_revoked(claims):
        raise TokenRevoked("this token has been revoked")
    for version in STOMP_SUBPROTOCOLS:
        if version in offered:
            return Upgrade(version, claims)
    raise UnsupportedSubprotocol(
        f"offer one of {', '.join(STOMP_SUBPROTOCOLS)} in Sec-WebSocket-Protocol"
    )


def _bearer_token(offered: list[str]) -> str:
    tokens = [entry[len(BEARER_PREFIX) :] for entry in offered if entry.startswith(BEARER_PREFIX)]
    if not tokens:
        raise MissingToken("offer the access token as a 'bearer.<token>' subprotocol entry")
    if len(tokens) > 1:
        raise InvalidToken("more than one bearer entry offered")
    return tokens[0]
