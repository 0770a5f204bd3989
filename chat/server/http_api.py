"""Plain HTTP routes on the TLS listener (PROTOCOL.md §1): request in, response out.

The listener parses requests with h11 and hands them here with the peer's certificate
identity; this module does no network I/O. The token routes spend and issue refresh tokens in
the state database, which blocks (another process may hold its write lock for seconds): they
await it in the state store's `Lane`, so the event loop and every other connection go on
meanwhile. Before that, each identity's token requests (both routes, one bucket) pass a rate
limit (PROTOCOL.md §12), and a refresh body must be exactly `{"refresh_token": "<string>"}`:
whatever else arrives is refused with its reason, never a traceback. JWKS is served from the
signing keys in memory. The admin routes (PROTOCOL.md §12) answer only identities whose
policy rights say `admin`; what they do is admin.py's. `/healthz` says `ok` only while the
server can serve: the last history commit did not fail and the state store answers a read;
`/readyz` gives the same checks as JSON, for people.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from chat.protocol.errors import HttpRefusal, InvalidDestination
from chat.protocol.policy import Policy
from chat.protocol.tokens import TokenAuthority
from chat.protocol.wire import BEARER_PREFIX, IDENTITY, STOMP_SUBPROTOCOL, TEXT_PLAIN, WS_PATH
from chat.server.admin import Admin
from chat.server.config import ServerConfig
from chat.server.ratelimit import RateLimiter
from chat.server.storage import Lane, StorageUnavailable
from chat.store.keys import KeyStore
from chat.store.state import StateStore

HEALTH_TIMEOUT = 2.0  # a state store that takes longer to answer one read is not serving
OK = "ok"

UPGRADE_HINT = (
    "This is a STOMP over WebSocket endpoint. Connect with wss:// and an Upgrade: websocket\n"
    f"request, offering the subprotocol {STOMP_SUBPROTOCOL} and a {BEARER_PREFIX}<token> entry"
    " in\nSec-WebSocket-Protocol (get the token with POST /auth/token).\n"
).encode()


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of the TLS connection: its client certificate's identity,
    thumbprint and serial, and where it connects from."""

    identity: str
    x5t: str
    address: str = ""  # the client's "ip:port" ("" below TLS, where there is none)
    serial: int | None = None  # matched against each new CRL; None: no certificate seen here


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """All values of `name` joined by ", " (RFC 9110 §5.3), or None."""
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Vitals:
    """What the health routes read from the running server, beyond the state store."""

    history_failure: Callable[[], str | None] = lambda: None  # the last commit's error, if any
    connections: Callable[[], int] = lambda: 0  # live STOMP connections
    started: float = field(default_factory=time.time)  # by the server's wall clock


class BadRequest(HttpRefusal):
    status = 400
    code = "invalid_request"


class RateLimited(HttpRefusal):
    """Token requests beyond the identity's rate (PROTOCOL.md §12); `Retry-After` in seconds."""

    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after))]


class AdminOnly(HttpRefusal):
    """An admin route asked for by an identity the policy does not make admin (§9, §12)."""

    status = 403
    code = "forbidden"


class NotFound(HttpRefusal):
    status = 404
    code = "not_found"


class MethodNotAllowed(HttpRefusal):
    status = 405
    code = "method_not_allowed"


def json_response(
    status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, (("Content-Type", "application/json"), *headers), body)


def refusal_response(error: HttpRefusal) -> Response:
    """The one shape of every refusal: status, JSON `{"error", "detail"}`, its own headers."""
    return json_response(
        error.status, {"error": error.code, "detail": error.detail}, tuple(error.headers())
    )


def text_response(status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, (("Content-Type", "text/plain; charset=utf-8"), *headers), body)


Handler = Callable[[Request, Peer], Awaitable[Response]]


class HttpApi:
    """Routes plain requests: token issue and refresh, JWKS, health, the admin routes, the
    426 hint and 404."""

    def __init__(
        self,
        authority: TokenAuthority,
        keys: KeyStore,
        state: StateStore,
        state_lane: Lane,
        config: ServerConfig,
        policy: Callable[[], Policy],
        admin: Admin,
        clock: Callable[[], float] = time.time,
        vitals: Vitals | None = None,
    ) -> None:
        self._authority = authority
        self._keys = keys
        self._state = state
        self._state_lane = state_lane
        self._config = config
        self._policy = policy
        self._admin = admin
        self._clock = clock
        self._vitals = vitals or Vitals()
        self._token_requests = RateLimiter(config.token_rate, config.token_burst)
        self._routes: dict[str, dict[str, Handler]] = {
            WS_PATH: {"GET": self._upgrade_required},
            "/auth/token": {"POST": self._token},
            "/auth/refresh": {"POST": self._refresh},
            "/.well-known/jwks.json": {"GET": self._jwks},
            "/healthz": {"GET": self._health},
            "/readyz": {"GET": self._ready},
            "/auth/me": {"GET": self._me},
            "/admin/publish": {"POST": self._admin_publish},
            "/admin/connections": {"GET": self._admin_connections},
            "/admin/disconnect": {"POST": self._admin_disconnect},
        }

    async def handle(self, request: Request, peer: Peer) -> Response:
        try:
            return await self._route(request)(request, peer)
        except HttpRefusal as error:
            return refusal_response(error)

    def _route(self, request: Request) -> Handler:
        methods = self._routes.get(request.path)
        if methods is None:
            raise NotFound(f"no route for {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            raise MethodNotAllowed(f"{request.path} accepts {allowed}, not {request.method}")
        return handler

    async def _upgrade_required(self, request: Request, peer: Peer) -> Response:
        return text_response(
            426, UPGRADE_HINT, (("Upgrade", "websocket"), ("Connection", "Upgrade"))
        )

    async def _health(self, request: Request, peer: Peer) -> Response:
        """200 `ok` while the server can serve; else 503 with what fails."""
        checks = await self._checks()
        if all(check == OK for check in checks.values()):
            return text_response(200, OK.encode(), (("Cache-Control", "no-store"),))
        return json_response(
            503, {"status": "unavailable", "checks": checks}, (("Cache-Control", "no-store"),)
        )

    async def _ready(self, request: Request, peer: Peer) -> Response:
        """The checks of /healthz and a little context, as JSON for people; same status."""
        checks = await self._checks()
        healthy = all(check == OK for check in checks.values())
        detail = {
            "status": OK if healthy else "unavailable",
            "checks": checks,
            "connections": self._vitals.connections(),
            "uptime_s": round(self._clock() - self._vitals.started, 3),
        }
        return json_response(200 if healthy else 503, detail, (("Cache-Control", "no-store"),))

    async def _checks(self) -> dict[str, str]:
        failure = self._vitals.history_failure()
        history = OK if failure is None else f"commits failing: {failure}"
        return {"history": history, "state": await self._state_answers()}

    async def _state_answers(self) -> str:
        with trio.move_on_after(HEALTH_TIMEOUT):
            try:
                await self._state_lane.run(self._state.revocation_version)
            except StorageUnavailable as exc:
                return f"failing: {exc.detail}"
            return OK
        return f"no answer within {HEALTH_TIMEOUT:g} s"

    async def _me(self, request: Request, peer: Peer) -> Response:
        """What the policy in force lets this identity do (PROTOCOL.md §9)."""
        rights = self._policy().rights(peer.identity)
        return json_response(200, rights.as_json(), (("Cache-Control", "no-store"),))

    async def _admin_publish(self, request: Request, peer: Peer) -> Response:
        """Publish as the admin identity; 200 once the message is durable (PROTOCOL.md §12)."""
        self._check_admin(peer)
        fields = _string_fields(request.body, PUBLISH_BODY, PUBLISH_REQUIRED, PUBLISH_OPTIONAL)
        content_type = fields.get("content_type", TEXT_PLAIN)
        if not content_type or not content_type.isprintable():
            raise BadRequest("content_type must be a non-empty string of printable characters")
        try:
            body = fields["body"].encode()
        except UnicodeEncodeError:  # JSON may escape a lone surrogate: "\ud800"
            raise BadRequest("body must be valid Unicode: it has a lone surrogate") from None
        try:
            stored = await self._admin.publish(
                peer.identity, fields["destination"], body, content_type
            )
        except InvalidDestination as exc:
            raise BadRequest(f"{exc.detail}; publish to /topic/NAME or /user/NAME") from None
        return json_response(200, {"offset": stored.offset, "epoch": stored.epoch})

    async def _admin_connections(self, request: Request, peer: Peer) -> Response:
        self._check_admin(peer)
        live = [connection.as_json() for connection in self._admin.connections()]
        return json_response(200, live, (("Cache-Control", "no-store"),))

    async def _admin_disconnect(self, request: Request, peer: Peer) -> Response:
        self._check_admin(peer)
        sub = _string_fields(request.body, DISCONNECT_BODY, ("sub",))["sub"]
        if IDENTITY.fullmatch(sub) is None:
            raise BadRequest("sub is not an identity (1-64 of A-Z a-z 0-9 _ . @ -)")
        return json_response(200, {"disconnected": self._admin.disconnect(peer.identity, sub)})

    def _check_admin(self, peer: Peer) -> None:
        if not self._policy().rights(peer.identity).admin:
            raise AdminOnly(f"the policy does not make {peer.identity} an admin (admin = true)")

    async def _jwks(self, request: Request, peer: Peer) -> Response:
        return json_response(200, self._keys.jwks(), (("Cache-Control", "max-age=60"),))

    async def _token(self, request: Request, peer: Peer) -> Response:
        now = self._clock()
        self._limit_token_requests(peer, now)
        # Refuses a revoked identity (identity_revoked) inside the same transaction.
        refresh = await self._state_lane.run(
            self._state.issue_refresh,
            peer.identity,
            peer.x5t,
            now,
            self._config.refresh_lifetime,
            self._config.max_refresh_families,
        )
        return self._grant(peer, refresh, now)

    async def _refresh(self, request: Request, peer: Peer) -> Response:
        now = self._clock()
        self._limit_token_requests(peer, now)
        presented = _refresh_token_of(request)
        refresh = await self._state_lane.run(
            self._state.rotate_refresh,
            presented,
            peer.identity,
            peer.x5t,
            now,
            self._config.refresh_lifetime,
        )
        return self._grant(peer, refresh, now)

    def _limit_token_requests(self, peer: Peer, now: float) -> None:
        """One bucket per identity for both token routes: each call may sign and write."""
        wait = self._token_requests.take(peer.identity, now)
        if wait:
            limiter = self._token_requests
            raise RateLimited(
                f"token requests are limited to {limiter.rate:g} per second and identity "
                f"(bursts of {limiter.burst:g}); try again in {wait:.1f} s",
                max(1, math.ceil(wait)),
            )

    def _grant(self, peer: Peer, refresh: str, now: float) -> Response:
        access, claims = self._authority.issue(peer.identity, peer.x5t, now)
        grant = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": claims.exp - int(now),
            "refresh_token": refresh,
        }
        # RFC 6749 §5.1: token responses must not be cached.
        return json_response(200, grant, (("Cache-Control", "no-store"), ("Pragma", "no-cache")))


# The bodies the POST routes take (PROTOCOL.md §7, §12), as their refusals quote them
REFRESH_BODY = '{"refresh_token": "..."}'
PUBLISH_BODY = '{"destination": "/topic/NAME", "body": "...", "content_type": "..."}'
PUBLISH_REQUIRED = ("destination", "body")  # destination: /topic/NAME or /user/NAME
PUBLISH_OPTIONAL = ("content_type",)  # default TEXT_PLAIN
DISCONNECT_BODY = '{"sub": "NAME"}'


def _refresh_token_of(request: Request) -> str:
    """The token of a body that is exactly `{"refresh_token": "<string>"}`."""
    token = _string_fields(request.body, REFRESH_BODY, ("refresh_token",))["refresh_token"]
    if not token:
        raise BadRequest("refresh_token is empty")
    return token


def _string_fields(
    body: bytes, shape: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, str]:
    """The fields of a body that is a JSON object of strings: every `required` one and any
    `optional` one, nothing else. Anything else is a `BadRequest` saying what is wrong and
    quoting `shape`, the body to send (never a traceback, whatever the bytes)."""
    payload = _json_of(body, shape)
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object {shape}, not {_json_kind(payload)}")
    unknown = ", ".join(repr(name) for name in sorted(set(payload) - {*required, *optional}))
    if unknown:
        raise BadRequest(f"body has unknown fields {unknown}: send {shape}")
    for name in required:
        if name not in payload:
            raise BadRequest(f"body has no {name}: send {shape}")
    for name, value in payload.items():
        if not isinstance(value, str) or isinstance(value, _Number):
            raise BadRequest(f"{name} must be a string, not {_json_kind(value)}")
    return payload


def _json_of(body: bytes, shape: str) -> object:
    """`body` parsed as JSON (`shape` is what to send instead). Numbers stay text: a
    5,000-digit one would trip Python's int-string limit, and no accepted body holds a
    number anyway."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadRequest(f"body must be UTF-8 JSON: {shape}") from None
    try:
        return json.loads(text, parse_int=_Number, parse_float=_Number, parse_constant=_Number)
    except RecursionError:  # the C scanner's guard against deep nesting: [[[[...]]]]
        raise BadRequest(f"body is nested too deeply: send {shape}") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON ({exc}): send {shape}") from None


class _Number(str):
    """A JSON number (or NaN, Infinity) kept as its text."""


_JSON_KINDS: tuple[tuple[type, str], ...] = (
    (_Number, "a number"),  # before str: a _Number is one
    (str, "a string"),
    (bool, "a boolean"),
    (dict, "an object"),
    (list, "an array"),
    (type(None), "null"),
)


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words, for a refusal's detail."""
    return next(name for kind, name in _JSON_KINDS if isinstance(value, kind))
