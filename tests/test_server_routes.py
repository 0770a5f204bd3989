"""The HTTP routes and the upgrade decision as plain values: a Request and a Peer in, a
Response (or an Upgrade, or the refusal with its wire code) out. No network; the state
database is SQLite in tmp_path, called on the event loop (`InlineLane`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chat.history import History
from chat.protocol.errors import HttpRefusal
from chat.protocol.policy import DEFAULT_POLICY, Policy
from chat.protocol.tokens import Claims, TokenAuthority, TokenPolicy
from chat.server.admin import Admin
from chat.server.broker import Broker
from chat.server.config import ServerConfig
from chat.server.durability import Durability
from chat.server.http_api import HttpApi, Peer, Request, Response, refusal_response
from chat.server.upgrade import authorize, is_upgrade
from chat.store.keys import KeyStore
from chat.store.state import StateStore
from tests.below_tls import InlineLane

NOW = 1_800_000_000.0
LIFETIME = 60
ALICE = Peer("alice", "alice-x5t")


@dataclass
class Server:
    authority: TokenAuthority
    keys: KeyStore
    state: StateStore
    api: HttpApi
    now: float = NOW

    def clock(self) -> float:
        return self.now


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    keys = KeyStore.open(tmp_path / "keys")
    authority = TokenAuthority(keys, TokenPolicy(lifetime=LIFETIME, leeway=0))
    state = StateStore.open(tmp_path / "state.db")
    holder: list[Server] = []
    policy = Policy.parse(DEFAULT_POLICY, "acl.toml")
    api = HttpApi(
        authority,
        keys,
        state,
        InlineLane(),
        ServerConfig(refresh_lifetime=3600),
        lambda: policy,
        idle_admin(),
        lambda: holder[0].clock(),
    )
    holder.append(Server(authority, keys, state, api))
    yield holder[0]
    state.close()


def idle_admin() -> Admin:
    """The admin routes over no connections and an empty history (tests/test_server_admin.py
    exercises them on a running server)."""
    history = History.memory()
    return Admin(set(), Broker(history, Durability(history, InlineLane())))


def request(method: str, path: str, *headers: tuple[str, str], body: bytes = b"") -> Request:
    return Request(method, path, headers, body)


def payload(response: Response) -> dict[str, object]:
    assert dict(response.headers)["Content-Type"] == "application/json"
    answer = json.loads(response.body)
    assert isinstance(answer, dict)
    return answer


def refusal(response: Response) -> tuple[int, object]:
    return response.status, payload(response)["error"]


# ---------------------------------------------------------------- HttpApi.handle


async def test_unknown_path_is_404(server: Server) -> None:
    assert refusal(await server.api.handle(request("GET", "/nope"), ALICE)) == (404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/auth/token", "POST"),
        ("PUT", "/auth/refresh", "POST"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/ws", "GET"),
    ],
)
async def test_wrong_method_is_405(server: Server, method: str, path: str, allowed: str) -> None:
    response = await server.api.handle(request(method, path), ALICE)
    assert refusal(response) == (405, "method_not_allowed")
    assert f"accepts {allowed}" in str(payload(response)["detail"])


async def test_plain_get_of_the_websocket_path_is_426(server: Server) -> None:
    response = await server.api.handle(request("GET", "/ws"), ALICE)
    assert response.status == 426
    assert ("Upgrade", "websocket") in response.headers
    assert b"bearer.<token>" in response.body


async def test_health(server: Server) -> None:
    response = await server.api.handle(request("GET", "/healthz"), ALICE)
    assert (response.status, response.body) == (200, b"ok")


async def test_jwks_lists_the_signing_key(server: Server) -> None:
    response = await server.api.handle(request("GET", "/.well-known/jwks.json"), ALICE)
    assert response.status == 200
    keys = payload(response)["keys"]
    assert isinstance(keys, list)
    assert [key["kid"] for key in keys] == [server.keys.active_kid]
    assert ("Cache-Control", "max-age=60") in response.headers


async def test_token_answer(server: Server) -> None:
    response = await server.api.handle(request("POST", "/auth/token"), ALICE)
    assert response.status == 200
    assert ("Cache-Control", "no-store") in response.headers  # RFC 6749 §5.1
    grant = payload(response)
    assert (grant["token_type"], grant["expires_in"]) == ("Bearer", LIFETIME)
    assert isinstance(grant["refresh_token"], str) and grant["refresh_token"]
    claims = server.authority.verify(str(grant["access_token"]), NOW)
    assert (claims.sub, claims.x5t, claims.exp) == ("alice", "alice-x5t", NOW + LIFETIME)


async def test_refresh_rotates_and_a_reuse_is_refused(server: Server) -> None:
    first = payload(await server.api.handle(request("POST", "/auth/token"), ALICE))
    body = json.dumps({"refresh_token": first["refresh_token"]}).encode()
    server.now = NOW + 10
    second = payload(await server.api.handle(request("POST", "/auth/refresh", body=body), ALICE))
    assert second["refresh_token"] != first["refresh_token"]
    claims = server.authority.verify(str(second["access_token"]), server.now)
    assert claims.exp == NOW + 10 + LIFETIME
    again = await server.api.handle(request("POST", "/auth/refresh", body=body), ALICE)
    assert refusal(again) == (401, "refresh_reused")


async def test_refresh_by_another_certificate_is_refused(server: Server) -> None:
    first = payload(await server.api.handle(request("POST", "/auth/token"), ALICE))
    body = json.dumps({"refresh_token": first["refresh_token"]}).encode()
    thief = Peer("alice", "another-x5t")
    response = await server.api.handle(request("POST", "/auth/refresh", body=body), thief)
    assert refusal(response) == (403, "token_cert_mismatch")


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"refresh_token": 5}', b'{"refresh_token": ""}']
)
async def test_refresh_needs_a_json_refresh_token(server: Server, body: bytes) -> None:
    response = await server.api.handle(request("POST", "/auth/refresh", body=body), ALICE)
    assert refusal(response) == (400, "invalid_request")


async def test_unknown_refresh_token(server: Server) -> None:
    body = json.dumps({"refresh_token": "never-issued"}).encode()
    response = await server.api.handle(request("POST", "/auth/refresh", body=body), ALICE)
    assert refusal(response) == (401, "invalid_refresh")


async def test_a_revoked_identity_gets_no_token(server: Server) -> None:
    server.state.revoke_sub("alice", NOW)
    response = await server.api.handle(request("POST", "/auth/token"), ALICE)
    assert refusal(response) == (403, "identity_revoked")


# ---------------------------------------------------------------- upgrade.authorize: §2's table


def upgrade_request(*offered: str) -> Request:
    headers = [("host", "chat.test"), ("upgrade", "websocket"), ("connection", "Upgrade")]
    if offered:
        headers.append(("sec-websocket-protocol", ", ".join(offered)))
    return Request("GET", "/ws", tuple(headers), b"")


def token(server: Server, sub: str = "alice", x5t: str = "alice-x5t", at: float = NOW) -> str:
    return server.authority.issue(sub, x5t, at)[0]


def decide(server: Server, req: Request, revoked: frozenset[str] = frozenset()) -> object:
    def is_revoked(claims: Claims) -> bool:
        return claims.jti in revoked or claims.sub in revoked

    return authorize(req, ALICE, server.authority, is_revoked, NOW)


def refused_with(server: Server, req: Request, revoked: frozenset[str] = frozenset()) -> Response:
    with pytest.raises(HttpRefusal) as info:
        decide(server, req, revoked)
    return refusal_response(info.value)


def test_an_upgrade_is_a_get_asking_for_websocket() -> None:
    assert is_upgrade(upgrade_request())
    assert not is_upgrade(request("GET", "/ws"))
    assert not is_upgrade(request("POST", "/ws", ("upgrade", "websocket")))


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no bearer entry", 401, "missing_token"),
        ("malformed", 401, "invalid_token"),
        ("two bearer entries", 401, "invalid_token"),
        ("bad signature", 401, "invalid_token"),
        ("expired", 401, "token_expired"),
        ("another identity", 403, "token_cert_mismatch"),
        ("another certificate", 403, "token_cert_mismatch"),
        ("revoked token", 401, "token_revoked"),
        ("revoked identity", 401, "token_revoked"),
        ("no STOMP version", 400, "unsupported_subprotocol"),
    ],
)
def test_every_refusal_of_the_table(server: Server, case: str, status: int, code: str) -> None:
    good = token(server)
    head, payload_part, signature = good.split(".")
    forged = f"{head}.{payload_part}.{signature[::-1]}"
    offers = {
        "no bearer entry": ["v12.stomp"],
        "malformed": ["v12.stomp", "bearer.not-a-jwt"],
        "two bearer entries": ["v12.stomp", f"bearer.{good}", f"bearer.{good}"],
        "bad signature": ["v12.stomp", f"bearer.{forged}"],
        "expired": ["v12.stomp", f"bearer.{token(server, at=NOW - LIFETIME)}"],
        "another identity": ["v12.stomp", f"bearer.{token(server, sub='bob')}"],
        "another certificate": ["v12.stomp", f"bearer.{token(server, x5t='other')}"],
        "revoked token": ["v12.stomp", f"bearer.{good}"],
        "revoked identity": ["v12.stomp", f"bearer.{good}"],
        "no STOMP version": ["v13.stomp", f"bearer.{good}"],
    }
    jti = server.authority.verify(good, NOW).jti
    revoked = {"revoked token": frozenset({jti}), "revoked identity": frozenset({"alice"})}
    response = refused_with(server, upgrade_request(*offers[case]), revoked.get(case, frozenset()))
    assert refusal(response) == (status, code)
    if status == 401:
        assert ("WWW-Authenticate", 'Bearer error="invalid_token"') in response.headers


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["v10.stomp", "v11.stomp", "v12.stomp"], "v12.stomp"),
        (["v10.stomp", "v11.stomp"], "v11.stomp"),
        (["v10.stomp"], "v10.stomp"),
    ],
)
def test_the_highest_stomp_version_is_chosen(
    server: Server, offered: list[str], chosen: str
) -> None:
    req = upgrade_request(*offered, f"bearer.{token(server)}")
    upgrade = authorize(req, ALICE, server.authority, lambda claims: False, NOW)
    assert upgrade.subprotocol == chosen
    assert upgrade.claims.sub == "alice"
