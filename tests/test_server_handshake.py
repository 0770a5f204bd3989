"""Every refusal row of PROTOCOL.md §2, against a real server over mutual TLS."""

from __future__ import annotations

import json
import time
import uuid

import jwt
import pytest
from trio_websocket import ConnectionRejected, open_websocket_url

from chat import pki as pki_module
from chat.store.keys import KeyStore
from tests.conftest import RunningServer, TestPki, raw_ws, token_for


async def refused(server: RunningServer, pki: TestPki, name: str, subprotocols: list[str]):
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(
            server.ws_url, ssl_context=pki.client_context(name), subprotocols=subprotocols
        ):
            pass
    rejection = info.value
    headers = {k.decode().lower(): v.decode() for k, v in rejection.headers}
    return rejection.status_code, json.loads(rejection.body), headers


def forge(server: RunningServer, pki: TestPki, name: str = "alice", **overrides) -> str:
    """A token signed with the server's own key, with claims changed as the test needs."""
    kid, key = KeyStore.open(server.config.state_dir / "keys").signing_key()
    der = pki_module.load_certificate(pki.client(name)[0]).public_bytes(_der())
    now = int(time.time())
    claims = {
        "iss": server.config.issuer,
        "aud": "chat",
        "sub": name,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "cnf": {"x5t#S256": pki_module.thumbprint(der)},
    }
    claims.update(overrides)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def _der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


async def assert_refused(server, pki, token: str, status: int, code: str, name="alice") -> None:
    got_status, body, headers = await refused(server, pki, name, ["v12.stomp", f"bearer.{token}"])
    assert (got_status, body["error"]) == (status, code), body
    assert body["detail"] and token not in body["detail"]
    if status == 401:
        assert headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_accepts_and_never_echoes_the_token(server: RunningServer, pki: TestPki) -> None:
    async with raw_ws(server, pki, "alice") as ws:
        assert ws.subprotocol == "v12.stomp"


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["v10.stomp", "v11.stomp"], "v11.stomp"),
        (["v10.stomp"], "v10.stomp"),
        (["v11.stomp", "v12.stomp", "v10.stomp"], "v12.stomp"),
    ],
)
async def test_selects_best_stomp_version(server, pki, offered, chosen) -> None:
    token = await token_for(server, pki, "alice")
    async with raw_ws(server, pki, "alice", subprotocols=[*offered, f"bearer.{token}"]) as ws:
        assert ws.subprotocol == chosen


async def test_missing_token(server: RunningServer, pki: TestPki) -> None:
    status, body, headers = await refused(server, pki, "alice", ["v12.stomp"])
    assert (status, body["error"]) == (401, "missing_token")
    assert headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_bad_signature(server: RunningServer, pki: TestPki) -> None:
    token = await token_for(server, pki, "alice")
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
    await assert_refused(server, pki, tampered, 401, "invalid_token")


async def test_alg_none(server: RunningServer, pki: TestPki) -> None:
    token = await token_for(server, pki, "alice")
    claims = jwt.decode(token, options={"verify_signature": False})
    none = jwt.encode(claims, None, algorithm="none", headers={"kid": "x"})
    await assert_refused(server, pki, none, 401, "invalid_token")


async def test_unknown_kid(server: RunningServer, pki: TestPki) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger = ec.generate_private_key(ec.SECP256R1())
    claims = jwt.decode(forge(server, pki), options={"verify_signature": False})
    token = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "unknown-kid"})
    await assert_refused(server, pki, token, 401, "invalid_token")


async def test_wrong_audience(server: RunningServer, pki: TestPki) -> None:
    await assert_refused(server, pki, forge(server, pki, aud="other"), 401, "invalid_token")


async def test_wrong_issuer(server: RunningServer, pki: TestPki) -> None:
    await assert_refused(server, pki, forge(server, pki, iss="evil"), 401, "invalid_token")


async def test_malformed(server: RunningServer, pki: TestPki) -> None:
    await assert_refused(server, pki, "not-a-jwt", 401, "invalid_token")


async def test_expired(server: RunningServer, pki: TestPki) -> None:
    past = int(time.time()) - 3600
    token = forge(server, pki, iat=past, nbf=past, exp=past + 60)
    await assert_refused(server, pki, token, 401, "token_expired")


async def test_token_of_another_certificate(server: RunningServer, pki: TestPki) -> None:
    token = await token_for(server, pki, "alice")
    await assert_refused(server, pki, token, 403, "token_cert_mismatch", name="bob")


async def test_token_with_matching_sub_but_other_thumbprint(server, pki) -> None:
    token = forge(server, pki, cnf={"x5t#S256": "A" * 43})
    await assert_refused(server, pki, token, 403, "token_cert_mismatch")


async def test_revoked_token(server: RunningServer, pki: TestPki) -> None:
    token = await token_for(server, pki, "alice")
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    server.server.state.revoke_jti(jti, time.time() + 600)
    await assert_refused(server, pki, token, 401, "token_revoked")


async def test_no_stomp_version_offered(server: RunningServer, pki: TestPki) -> None:
    token = await token_for(server, pki, "alice")
    status, body, _ = await refused(server, pki, "alice", ["mqtt", f"bearer.{token}"])
    assert (status, body["error"]) == (400, "unsupported_subprotocol")


async def test_token_from_trusted_external_issuer(start_server, pki: TestPki, tmp_path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    idp_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(idp_key.public_key()))
    jwks = tmp_path / "idp.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "idp-1", "alg": "ES256", "use": "sig"}]}))
    server = await start_server(trusted_jwks=((jwks, "https://idp.example"),))
    claims = jwt.decode(forge(server, pki), options={"verify_signature": False})
    external = jwt.encode(
        {**claims, "iss": "https://idp.example"},
        idp_key,
        algorithm="ES256",
        headers={"kid": "idp-1"},
    )
    async with raw_ws(server, pki, "alice", token=external) as ws:
        assert ws.subprotocol == "v12.stomp"
    # the provider's key cannot mint tokens under our own issuer
    ours = jwt.encode(claims, idp_key, algorithm="ES256", headers={"kid": "idp-1"})
    await assert_refused(server, pki, ours, 401, "invalid_token")
