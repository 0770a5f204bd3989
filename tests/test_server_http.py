"""Plain HTTP routes and the TLS layer of the listener (PROTOCOL.md §1)."""

from __future__ import annotations

import base64
import json
import ssl

import jwt
import pytest
import trio

from chat import pki as pki_module
from chat.server.config import ServerConfig
from tests.conftest import RunningServer, TestPki, http_request, raw_ws, token_for


async def test_healthz(server: RunningServer, pki: TestPki) -> None:
    reply = await http_request(server, pki.client_context("alice"), "GET", "/healthz")
    assert (reply.status, reply.body) == (200, b"ok")


async def test_unknown_route_is_404_json(server: RunningServer, pki: TestPki) -> None:
    reply = await http_request(server, pki.client_context("alice"), "GET", "/nope")
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"


async def test_wrong_method_is_405(server: RunningServer, pki: TestPki) -> None:
    reply = await http_request(server, pki.client_context("alice"), "GET", "/auth/token")
    assert reply.status == 405
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"] == "method_not_allowed"


async def test_ws_without_upgrade_is_426_with_hint(server: RunningServer, pki: TestPki) -> None:
    reply = await http_request(server, pki.client_context("alice"), "GET", "/ws")
    assert reply.status == 426
    for hint in (b"wss://", b"v12.stomp", b"bearer.<token>"):
        assert hint in reply.body


async def test_token_endpoint_issues_certificate_bound_token(
    server: RunningServer, pki: TestPki
) -> None:
    reply = await http_request(server, pki.client_context("alice"), "POST", "/auth/token")
    assert reply.status == 200
    assert reply.headers["cache-control"] == "no-store"
    grant = reply.json()
    assert set(grant) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert grant["token_type"] == "Bearer"
    assert 0 < grant["expires_in"] <= ServerConfig().token_lifetime
    claims = jwt.decode(grant["access_token"], options={"verify_signature": False})
    cert, _ = pki.client(name="alice")
    der = pki_module.load_certificate(cert).public_bytes(serialization_der())
    assert claims["sub"] == "alice"
    assert claims["aud"] == "chat"
    assert claims["cnf"] == {"x5t#S256": pki_module.thumbprint(der)}
    assert {"iss", "iat", "nbf", "exp", "jti"} <= set(claims)
    header = jwt.get_unverified_header(grant["access_token"])
    assert header["alg"] == "ES256"
    jwks = (
        await http_request(server, pki.client_context("bob"), "GET", "/.well-known/jwks.json")
    ).json()
    assert header["kid"] in {key["kid"] for key in jwks["keys"]}


def serialization_der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


async def test_thumbprint_is_base64url_sha256_of_der(pki: TestPki) -> None:
    import hashlib

    der = pki_module.load_certificate(pki.client("alice")[0]).public_bytes(serialization_der())
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert pki_module.thumbprint(der) == expected


async def test_jwks_verifies_issued_tokens(server: RunningServer, pki: TestPki) -> None:
    token = await token_for(server, pki, "alice")
    jwks = (
        await http_request(server, pki.client_context("alice"), "GET", "/.well-known/jwks.json")
    ).json()
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [key for key in jwks["keys"] if key["kid"] == kid]
    public = jwt.PyJWK(jwk).key
    claims = jwt.decode(token, public, algorithms=["ES256"], audience="chat")
    assert claims["sub"] == "alice"


async def test_refresh_rotates_and_detects_reuse(server: RunningServer, pki: TestPki) -> None:
    context = pki.client_context("alice")
    first = (await http_request(server, context, "POST", "/auth/token")).json()
    body = json.dumps({"refresh_token": first["refresh_token"]}).encode()
    second = await http_request(server, context, "POST", "/auth/refresh", body=body)
    assert second.status == 200 and second.json()["refresh_token"] != first["refresh_token"]
    replay = await http_request(server, context, "POST", "/auth/refresh", body=body)
    assert (replay.status, replay.json()["error"]) == (401, "refresh_reused")
    # the whole family is revoked: the newest refresh token is dead too
    newest = json.dumps({"refresh_token": second.json()["refresh_token"]}).encode()
    after = await http_request(server, context, "POST", "/auth/refresh", body=newest)
    assert after.status == 401


async def test_refresh_bad_body_is_400(server: RunningServer, pki: TestPki) -> None:
    reply = await http_request(
        server, pki.client_context("alice"), "POST", "/auth/refresh", body=b"not json"
    )
    assert (reply.status, reply.json()["error"]) == (400, "invalid_request")


async def test_refresh_by_another_certificate_is_403(server: RunningServer, pki: TestPki) -> None:
    grant = (await http_request(server, pki.client_context("alice"), "POST", "/auth/token")).json()
    body = json.dumps({"refresh_token": grant["refresh_token"]}).encode()
    reply = await http_request(
        server, pki.client_context("bob"), "POST", "/auth/refresh", body=body
    )
    assert (reply.status, reply.json()["error"]) == (403, "token_cert_mismatch")


async def _refuses(server: RunningServer, context: ssl.SSLContext) -> bool:
    """Whether the server refuses `context`'s certificate at the TLS handshake."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=context)
    try:
        await stream.do_handshake()
        # TLS 1.3: the server's refusal of our certificate arrives after our handshake completes
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return await stream.receive_some(1024) == b""
    except (trio.BrokenResourceError, ssl.SSLError):
        return True
    finally:
        await trio.aclose_forcefully(stream)


async def _handshake_fails(server: RunningServer, context: ssl.SSLContext) -> None:
    assert await _refuses(server, context)


async def test_tls_without_client_certificate_fails(server: RunningServer, pki: TestPki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    await _handshake_fails(server, context)


async def test_tls_with_foreign_ca_certificate_fails(server: RunningServer, pki: TestPki) -> None:
    await _handshake_fails(server, pki.foreign_context())


async def _refused_within(server: RunningServer, context: ssl.SSLContext, seconds: float) -> None:
    """The server comes to refuse `context` within `seconds` (it re-reads its CRL when the
    file changes, PROTOCOL.md §12)."""
    with trio.fail_after(seconds):
        while not await _refuses(server, context):
            await trio.sleep(0.01)


async def test_tls_with_revoked_certificate_fails(start_server, tmp_path) -> None:
    own, _ = pki_module.ensure_dev_pki(tmp_path / "certs", ("dave",))
    running = await start_server(certs_dir=own.directory)
    context = pki_module.client_ssl_context(*own.client("dave"), own.ca)
    reply = await http_request(running, context, "GET", "/healthz")
    assert reply.status == 200
    pki_module.revoke(own.directory, "dave")
    dave = pki_module.client_ssl_context(*own.client("dave"), own.ca)
    await _refused_within(running, dave, 2)  # PROTOCOL.md §12, at the default poll


async def test_a_broken_crl_keeps_the_previous_one_in_force(
    start_server, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CRL rewritten into garbage (a half-written file) is logged and ignored: clients
    keep connecting, and a certificate the old CRL revoked stays refused."""
    own, _ = pki_module.ensure_dev_pki(tmp_path / "certs", ("dave", "erin"))
    pki_module.revoke(own.directory, "dave")
    running = await start_server(certs_dir=own.directory, revocation_poll=0.05)
    own.crl.write_bytes(b"-----BEGIN X509 CRL-----\nnot a crl\n")
    with trio.fail_after(2):
        while "TLS files not reloaded, the previous ones stay in force" not in caplog.text:
            await trio.sleep(0.05)
    assert f"{own.crl} is not a PEM certificate revocation list" in caplog.text
    erin = pki_module.client_ssl_context(*own.client("erin"), own.ca)
    assert (await http_request(running, erin, "GET", "/healthz")).status == 200
    await _handshake_fails(running, pki_module.client_ssl_context(*own.client("dave"), own.ca))


async def test_token_survives_server_restart(start_server, pki: TestPki, tmp_path) -> None:
    state = tmp_path / "persisted"
    first = await start_server(state_dir=state)
    token = await token_for(first, pki, "alice")
    first.server.shutdown()
    second = await start_server(state_dir=state)
    async with raw_ws(second, pki, "alice", token=token) as ws:
        assert ws.subprotocol == "v12.stomp"
