"""Access tokens and signing keys: PROTOCOL.md §2 (refusal table) and §3 (claims, keys)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.utils import base64url_encode

from chat.protocol.errors import HttpRefusal
from chat.protocol.tokens import (
    AUDIENCE,
    Claims,
    IdentityRevoked,
    InvalidRefresh,
    InvalidToken,
    MissingToken,
    RefreshExpired,
    RefreshReused,
    TokenAuthority,
    TokenCertMismatch,
    TokenConfigError,
    TokenExpired,
    TokenPolicy,
    TokenRevoked,
    TrustedIssuer,
    check_binding,
    jwk_thumbprint,
)
from chat.store.keys import KeyStore

NOW = 1_700_000_000.0
X5T = "q3bHd0Gm0fT8Nz7W2sXkq0o2m1R8y5m2bB0lT1iYf8E"
IDP = "https://idp.example"


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore.open(tmp_path / "keys")


@pytest.fixture
def authority(store: KeyStore) -> TokenAuthority:
    return TokenAuthority(store)


def _b64json(value: object) -> str:
    return base64url_encode(json.dumps(value).encode()).decode()


def _payload(**changes: Any) -> dict[str, Any]:
    """Claims exactly like ours, with some replaced (None drops the claim)."""
    base = {
        "iss": "chat",
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 300,
        "jti": "j1",
        "cnf": {"x5t#S256": X5T},
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def _signed(store: KeyStore, kid: str | None = None, **changes: Any) -> str:
    """A token signed by `store`'s active key, header kid overridable."""
    active, key = store.signing_key()
    return jwt.encode(_payload(**changes), key, algorithm="ES256", headers={"kid": kid or active})


def _refused(authority: TokenAuthority, token: str, kind: type[HttpRefusal]) -> HttpRefusal:
    """Assert the exact refusal class, and that the detail never echoes the token."""
    with pytest.raises(HttpRefusal) as caught:
        authority.verify(token, NOW)
    assert type(caught.value) is kind
    assert not token or token not in caught.value.detail
    return caught.value


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        (MissingToken, 401, "missing_token"),
        (InvalidToken, 401, "invalid_token"),
        (TokenExpired, 401, "token_expired"),
        (TokenCertMismatch, 403, "token_cert_mismatch"),
        (TokenRevoked, 401, "token_revoked"),
        (IdentityRevoked, 403, "identity_revoked"),
        (InvalidRefresh, 401, "invalid_refresh"),
        (RefreshExpired, 401, "refresh_expired"),
        (RefreshReused, 401, "refresh_reused"),
    ],
)
def test_refusals_carry_their_wire_code(kind: type[HttpRefusal], status: int, code: str) -> None:
    error = kind("why")
    assert (error.status, error.code, error.detail) == (status, code, "why")
    assert bool(error.headers()) == (status == 401)


# ---------------------------------------------------------------- issue and verify


def test_issue_verify_round_trip(authority: TokenAuthority) -> None:
    token, claims = authority.issue("alice", X5T, NOW)
    assert authority.verify(token, NOW + 1) == claims
    assert claims == Claims("chat", "alice", int(NOW), int(NOW), int(NOW) + 300, claims.jti, X5T)


def test_claims_and_header_are_exactly_protocol_section_3(
    authority: TokenAuthority, store: KeyStore
) -> None:
    token, claims = authority.issue("alice", X5T, NOW)
    header = jwt.get_unverified_header(token)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert header == {"alg": "ES256", "kid": store.active_kid, "typ": "JWT"}
    assert payload == {
        "iss": "chat",
        "aud": "chat",
        "sub": "alice",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 300,
        "jti": claims.jti,
        "cnf": {"x5t#S256": X5T},
    }


def test_every_token_gets_a_fresh_jti(authority: TokenAuthority) -> None:
    jtis = {authority.issue("alice", X5T, NOW)[1].jti for _ in range(20)}
    assert len(jtis) == 20


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
def test_other_algorithms_round_trip(tmp_path: Path, algorithm: str) -> None:
    store = KeyStore.open(tmp_path / "keys", algorithm)
    authority = TokenAuthority(store, TokenPolicy(algorithms=(algorithm,)))
    token, claims = authority.issue("bob", X5T, NOW)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    assert authority.verify(token, NOW) == claims
    assert store.jwks()["keys"][0]["alg"] == algorithm


def test_policy_refuses_symmetric_and_none_algorithms() -> None:
    for algorithms in (("none",), ("HS256",), ("ES256", "HS256"), ()):
        with pytest.raises(TokenConfigError):
            TokenPolicy(algorithms=algorithms)


def test_authority_refuses_a_policy_that_cannot_verify_its_own_key(store: KeyStore) -> None:
    with pytest.raises(TokenConfigError):
        TokenAuthority(store, TokenPolicy(algorithms=("EdDSA",)))


# ---------------------------------------------------------------- key store


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 7638 §3.1 worked example.
    key = RSAAlgorithm.from_jwk(
        {
            "kty": "RSA",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR"
            "1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65Y"
            "GjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrd"
            "kt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKn"
            "qDKgw",
        }
    )
    assert jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_keys_persist_across_reopen(tmp_path: Path) -> None:
    first = KeyStore.open(tmp_path / "keys")
    token, claims = TokenAuthority(first).issue("alice", X5T, NOW)
    reopened = KeyStore.open(tmp_path / "keys")
    assert reopened.active_kid == first.active_kid
    assert TokenAuthority(reopened).verify(token, NOW) == claims


def test_key_files_are_owner_only(tmp_path: Path, store: KeyStore) -> None:
    store.rotate(NOW)
    directory = tmp_path / "keys"
    pems = sorted(directory.glob("*.pem"))
    assert len(pems) == 2
    for path in [*pems, directory / "keys.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_rotate_keeps_old_tokens_valid(store: KeyStore, authority: TokenAuthority) -> None:
    old_kid = store.active_kid
    old_token, old_claims = authority.issue("alice", X5T, NOW)
    new_kid = store.rotate(NOW)
    new_token, _ = authority.issue("alice", X5T, NOW)
    assert new_kid != old_kid and store.active_kid == new_kid
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert authority.verify(old_token, NOW) == old_claims
    keys = store.jwks()["keys"]
    assert {key["kid"] for key in keys} == {old_kid, new_kid}
    assert all(key["alg"] == "ES256" and key["use"] == "sig" and "d" not in key for key in keys)


def test_prune_drops_a_retired_key_only_after_the_max_lifetime(
    tmp_path: Path, store: KeyStore, authority: TokenAuthority
) -> None:
    old_kid = store.active_kid
    old_token, _ = authority.issue("alice", X5T, NOW)
    store.rotate(NOW)
    assert store.prune(NOW + 329, max_token_lifetime=330) == []
    assert authority.verify(old_token, NOW) is not None
    assert store.prune(NOW + 330, max_token_lifetime=330) == [old_kid]
    assert store.public_key(old_kid) is None
    assert [key["kid"] for key in store.jwks()["keys"]] == [store.active_kid]
    assert not (tmp_path / "keys" / f"{old_kid}.pem").exists()
    assert KeyStore.open(tmp_path / "keys").public_key(old_kid) is None
    _refused(authority, old_token, InvalidToken)


def test_reload_sees_another_process_rotation(tmp_path: Path, store: KeyStore) -> None:
    other = KeyStore.open(tmp_path / "keys")
    new_kid = other.rotate(NOW)
    assert store.public_key(new_kid) is None
    store.reload()
    assert store.active_kid == new_kid
    assert store.public_key(new_kid) is not None


def test_refresh_rereads_the_directory_only_when_it_changed(
    tmp_path: Path, store: KeyStore
) -> None:
    directory = tmp_path / "keys"
    assert store.refresh()  # never looked before
    assert not store.refresh()
    new_kid = KeyStore.open(directory).rotate(NOW)
    moved = directory.stat().st_mtime_ns + 1  # as a clock coarser than two writes would not
    os.utime(directory, ns=(moved, moved))
    assert store.refresh()
    assert store.active_kid == new_kid
    assert not store.refresh()


def test_a_key_file_that_does_not_match_its_kid_is_refused(tmp_path: Path) -> None:
    kid = KeyStore.open(tmp_path / "a").active_kid
    stranger = KeyStore.open(tmp_path / "b").active_kid
    (tmp_path / "a" / f"{kid}.pem").write_bytes((tmp_path / "b" / f"{stranger}.pem").read_bytes())
    with pytest.raises(TokenConfigError):
        KeyStore.open(tmp_path / "a")


# ---------------------------------------------------------------- hardening


def test_alg_none_is_refused(authority: TokenAuthority, store: KeyStore) -> None:
    token = f"{_b64json({'alg': 'none', 'kid': store.active_kid})}.{_b64json(_payload())}."
    assert "algorithm" in _refused(authority, token, InvalidToken).detail


def test_hs256_with_the_public_key_as_secret_is_refused(
    authority: TokenAuthority, store: KeyStore
) -> None:
    public_pem = store.public_key(store.active_kid).public_bytes(  # type: ignore[union-attr]
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64json({"alg": "HS256", "kid": store.active_kid, "typ": "JWT"})
    signing_input = f"{header}.{_b64json(_payload())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64url_encode(mac).decode()}"
    assert "algorithm" in _refused(authority, token, InvalidToken).detail


def test_alg_must_match_the_key_even_when_both_are_allowed(store: KeyStore) -> None:
    authority = TokenAuthority(store, TokenPolicy(algorithms=("ES256", "EdDSA")))
    token = _signed(store)
    header, payload, signature = token.split(".")
    relabelled = f"{_b64json({'alg': 'EdDSA', 'kid': store.active_kid})}.{payload}.{signature}"
    assert "match" in _refused(authority, relabelled, InvalidToken).detail


def test_unknown_kid_is_refused(authority: TokenAuthority, store: KeyStore) -> None:
    assert "kid" in _refused(authority, _signed(store, kid="no-such-key"), InvalidToken).detail


def test_missing_kid_is_refused(authority: TokenAuthority, store: KeyStore) -> None:
    _, key = store.signing_key()
    token = jwt.encode(_payload(), key, algorithm="ES256")
    assert "kid" in _refused(authority, token, InvalidToken).detail


@pytest.mark.parametrize("kid", ["../../etc/passwd", "a/b", "..", "a\\b", ".hidden", "a..b", ""])
def test_kid_with_path_characters_is_refused(
    authority: TokenAuthority, store: KeyStore, kid: str
) -> None:
    header = _b64json({"alg": "ES256", "kid": kid})
    token = f"{header}.{_signed(store).split('.', 1)[1]}"
    assert "plain" in _refused(authority, token, InvalidToken).detail


def test_wrong_audience_is_refused(authority: TokenAuthority, store: KeyStore) -> None:
    _refused(authority, _signed(store, aud="other-service"), InvalidToken)
    _refused(authority, _signed(store, aud=None), InvalidToken)


def test_wrong_issuer_is_refused(authority: TokenAuthority, store: KeyStore) -> None:
    _refused(authority, _signed(store, iss="someone-else"), InvalidToken)
    _refused(authority, _signed(store, iss=None), InvalidToken)


def test_nbf_in_the_future_is_refused(authority: TokenAuthority, store: KeyStore) -> None:
    assert authority.verify(_signed(store, nbf=int(NOW) + 30), NOW).sub == "alice"
    error = _refused(authority, _signed(store, nbf=int(NOW) + 31), InvalidToken)
    assert error.detail == "token not yet valid"


def test_iat_in_the_future_is_refused(authority: TokenAuthority, store: KeyStore) -> None:
    _refused(authority, _signed(store, iat=int(NOW) + 3600), InvalidToken)


def test_expiry_honours_the_leeway(authority: TokenAuthority, store: KeyStore) -> None:
    assert authority.verify(_signed(store, exp=int(NOW) - 29), NOW).sub == "alice"
    error = _refused(authority, _signed(store, exp=int(NOW) - 30), TokenExpired)
    assert (error.status, error.code) == (401, "token_expired")


def test_verify_uses_the_given_time_not_the_clock(authority: TokenAuthority) -> None:
    token, _ = authority.issue("alice", X5T, NOW)
    assert authority.verify(token, NOW + 329).sub == "alice"
    with pytest.raises(TokenExpired):
        authority.verify(token, NOW + 330)


@pytest.mark.parametrize(
    "claim",
    ["sub", "jti", "iat", "nbf", "exp", "cnf"],
)
def test_every_required_claim_is_required(
    authority: TokenAuthority, store: KeyStore, claim: str
) -> None:
    _refused(authority, _signed(store, **{claim: None}), InvalidToken)


@pytest.mark.parametrize(
    "changes",
    [
        {"cnf": {"x5t": X5T}},
        {"cnf": "x"},
        {"sub": 7},
        {"sub": ""},
        {"jti": 3},
        {"exp": "soon"},
        {"iat": True},
        {"exp": float("inf")},
        {"nbf": float("nan")},
    ],
)
def test_claims_of_the_wrong_shape_are_refused(
    authority: TokenAuthority, store: KeyStore, changes: dict[str, Any]
) -> None:
    _refused(authority, _signed(store, **changes), InvalidToken)


def test_oversized_token_is_refused_before_parsing(
    authority: TokenAuthority, store: KeyStore
) -> None:
    token = _signed(store, padding="x" * 8192)
    assert "longer" in _refused(authority, token, InvalidToken).detail


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.###.$$$",
        "é.é.é",
        f"{base64url_encode(b'not json').decode()}.{_b64json({})}.sig",
        f"{_b64json(['a', 'list'])}.{_b64json({})}.sig",
        f"{_b64json({'alg': 'ES256', 'kid': 'k'})}.{base64url_encode(b'[1]').decode()}.sig",
        f"{_b64json({'alg': 'ES256', 'kid': 5})}.{_b64json({})}.sig",
    ],
)
def test_garbage_is_an_invalid_token(authority: TokenAuthority, token: str) -> None:
    _refused(authority, token, InvalidToken)


def test_tampered_payload_fails_the_signature(authority: TokenAuthority, store: KeyStore) -> None:
    header, _, signature = _signed(store).split(".")
    token = f"{header}.{_b64json(_payload(sub='mallory'))}.{signature}"
    assert "signature" in _refused(authority, token, InvalidToken).detail


def test_another_key_with_our_kid_forged_is_refused(
    tmp_path: Path, authority: TokenAuthority, store: KeyStore
) -> None:
    attacker = KeyStore.open(tmp_path / "attacker")
    _, attacker_key = attacker.signing_key()
    token = jwt.encode(
        _payload(), attacker_key, algorithm="ES256", headers={"kid": store.active_kid}
    )
    assert "signature" in _refused(authority, token, InvalidToken).detail


# ---------------------------------------------------------------- certificate binding


def test_check_binding_accepts_the_matching_certificate(authority: TokenAuthority) -> None:
    _, claims = authority.issue("alice", X5T, NOW)
    check_binding(claims, "alice", X5T)


@pytest.mark.parametrize(("identity", "x5t"), [("mallory", X5T), ("alice", "other-thumbprint")])
def test_check_binding_refuses_another_certificate(
    authority: TokenAuthority, identity: str, x5t: str
) -> None:
    _, claims = authority.issue("alice", X5T, NOW)
    with pytest.raises(TokenCertMismatch) as caught:
        check_binding(claims, identity, x5t)
    assert (caught.value.status, caught.value.code) == (403, "token_cert_mismatch")


# ---------------------------------------------------------------- trusted issuers


@pytest.fixture
def idp_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_jwks(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(entries)}))
    return path


def _idp_jwk(key: ec.EllipticCurvePrivateKey, **extra: Any) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "idp-1", **extra}


@pytest.fixture
def with_idp(
    tmp_path: Path, store: KeyStore, idp_key: ec.EllipticCurvePrivateKey
) -> TokenAuthority:
    jwks = _write_jwks(tmp_path / "idp.json", _idp_jwk(idp_key, use="sig", alg="ES256"))
    return TokenAuthority(store, trusted=[TrustedIssuer.from_jwks_file(jwks, IDP)])


def test_trusted_issuer_is_accepted_with_its_own_iss(
    with_idp: TokenAuthority, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(_payload(iss=IDP), idp_key, algorithm="ES256", headers={"kid": "idp-1"})
    assert with_idp.verify(token, NOW).iss == IDP


def test_trusted_issuer_key_cannot_sign_for_our_issuer(
    with_idp: TokenAuthority, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(_payload(iss="chat"), idp_key, algorithm="ES256", headers={"kid": "idp-1"})
    _refused(with_idp, token, InvalidToken)


def test_our_key_cannot_sign_for_a_trusted_issuer(
    with_idp: TokenAuthority, store: KeyStore
) -> None:
    _refused(with_idp, _signed(store, iss=IDP), InvalidToken)


def test_jwks_file_keeps_only_public_keys(
    tmp_path: Path, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    private_jwk = {**ECAlgorithm.to_jwk(idp_key, as_dict=True), "kid": "idp-1"}
    issuer = TrustedIssuer.from_jwks_file(_write_jwks(tmp_path / "k.json", private_jwk), IDP)
    assert isinstance(issuer.keys["idp-1"], ec.EllipticCurvePublicKey)


@pytest.mark.parametrize(
    "entry",
    [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "broken"},
    ],
)
def test_jwks_file_refuses_unusable_keys(tmp_path: Path, entry: dict[str, Any]) -> None:
    with pytest.raises(TokenConfigError):
        TrustedIssuer.from_jwks_file(_write_jwks(tmp_path / "k.json", entry), IDP)


def test_jwks_file_refuses_path_kids_and_alg_mismatch(
    tmp_path: Path, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    for extra in ({"kid": "../x"}, {"alg": "RS256"}):
        path = _write_jwks(tmp_path / "k.json", _idp_jwk(idp_key, **extra))
        with pytest.raises(TokenConfigError):
            TrustedIssuer.from_jwks_file(path, IDP)


def test_trusted_issuer_may_not_claim_our_issuer(
    tmp_path: Path, store: KeyStore, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks = _write_jwks(tmp_path / "idp.json", _idp_jwk(idp_key))
    with pytest.raises(TokenConfigError):
        TokenAuthority(store, trusted=[TrustedIssuer.from_jwks_file(jwks, "chat")])
