"""Certificate-bound access tokens (PROTOCOL.md §2, §3): issue and verify.

How this works: `TokenAuthority` signs with, and verifies against, a set of `SigningKeys`
(the server's is `chat.store.keys.KeyStore`, kept on disk; the key id is the RFC 7638
thumbprint of the public key, `jwk_thumbprint`). `TokenAuthority.verify` refuses cheaply
before any signature work (size, shape, header JSON, `alg` allow-list, `kid` syntax, issuer,
known `kid`), then lets PyJWT check the signature with the one algorithm the looked-up key
implies, and checks times against the `now` it is given. Every refusal is an `HttpRefusal`
carrying its row of the refusal table; details never echo the token. Pure module: no trio,
no I/O, no clock reads in `verify`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, TypeGuard

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import get_default_algorithms
from jwt.utils import base64url_encode

from chat.protocol.errors import HttpRefusal

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | Ed25519PublicKey | rsa.RSAPublicKey
PRIVATE_KEY_TYPES = (ec.EllipticCurvePrivateKey, Ed25519PrivateKey, rsa.RSAPrivateKey)

AUDIENCE = "chat"  # PROTOCOL.md §3: every access token names this audience
CNF_THUMBPRINT = "x5t#S256"  # RFC 8705 §3.1 confirmation member
REQUIRED_CLAIMS = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti", "cnf")  # PROTOCOL.md §3
JTI_BYTES = 16  # 128 random bits: unguessable, collision-free token ids
MAX_KID_CHARS = 128  # far above a 43-char thumbprint; bounds what we compare and look up
MAX_SHOWN_CHARS = 24  # attacker-chosen header values quoted in a detail are cut to this

# A compact JWS: three base64url parts; the signature may be empty so `none` reaches the alg check.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# A plain key id: word segments joined by single "." or ":" -- no "/", "\", ".." or leading dot.
_PLAIN_KID = re.compile(r"[A-Za-z0-9_-]+(?:[.:][A-Za-z0-9_-]+)*")
# RFC 7638 §3.2 (and RFC 8037 §2 for OKP): the members a JWK thumbprint covers, per key type.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}
_EC_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_VERIFIABLE_ALGORITHMS = frozenset({*_EC_CURVE_ALGORITHMS.values(), "EdDSA", "RS256"})


class TokenConfigError(ValueError):
    """A key directory, JWKS file or token policy that cannot be used (the CLI exits 2)."""


class MissingToken(HttpRefusal):
    status = 401
    code = "missing_token"


class InvalidToken(HttpRefusal):
    status = 401
    code = "invalid_token"


class TokenExpired(HttpRefusal):
    status = 401
    code = "token_expired"


class TokenCertMismatch(HttpRefusal):
    status = 403
    code = "token_cert_mismatch"


class TokenRevoked(HttpRefusal):
    status = 401
    code = "token_revoked"


class IdentityRevoked(HttpRefusal):
    """The token endpoint refuses an identity the operator blocked (PROTOCOL.md §7)."""

    status = 403
    code = "identity_revoked"


class InvalidRefresh(HttpRefusal):
    status = 401
    code = "invalid_refresh"


class RefreshExpired(HttpRefusal):
    status = 401
    code = "refresh_expired"


class RefreshReused(HttpRefusal):
    status = 401
    code = "refresh_reused"


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of an access token; `x5t` is `cnf["x5t#S256"]`."""

    iss: str
    sub: str
    iat: int
    nbf: int
    exp: int
    jti: str
    x5t: str


# ---------------------------------------------------------------------------- key helpers


def algorithm_of(key: object) -> str | None:
    """The one JWS algorithm a public key verifies, or None for a key we do not accept."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_CURVE_ALGORITHMS.get(key.curve.name)
    if isinstance(key, Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    return None


def public_jwk(key: PublicKey) -> dict[str, Any]:
    """The public JWK members of `key`, as PyJWT writes them."""
    algorithm = algorithm_of(key)
    if algorithm is None:
        raise TokenConfigError(f"unsupported key type {type(key).__name__}")
    return dict(get_default_algorithms()[algorithm].to_jwk(key, as_dict=True))


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): a stable, path-safe key id."""
    jwk = public_jwk(key)
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64url_encode(hashlib.sha256(canonical).digest()).decode("ascii")


def is_plain_kid(kid: object) -> TypeGuard[str]:
    return isinstance(kid, str) and len(kid) <= MAX_KID_CHARS and bool(_PLAIN_KID.fullmatch(kid))


class SigningKeys(Protocol):
    """The keys an authority signs with and verifies against (`chat.store.keys.KeyStore`).

    Each call is answered from memory: the authority runs on the event loop.
    """

    @property
    def active_kid(self) -> str: ...

    def signing_key(self) -> tuple[str, PrivateKey]:
        """(kid, key) of the active key."""
        ...

    def public_key(self, kid: str) -> PublicKey | None:
        """The public key named `kid`, or None when there is no such key."""
        ...


# ---------------------------------------------------------------------------- policy, issuers


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What the verifier accepts; only asymmetric algorithms may be configured."""

    issuer: str = "chat"
    lifetime: float = 300.0  # access token seconds
    leeway: float = 30.0  # clock skew seconds for exp/nbf/iat
    algorithms: tuple[str, ...] = ("ES256",)
    max_token_bytes: int = 8192  # oversized token -> InvalidToken before any parsing

    def __post_init__(self) -> None:
        unsafe = set(self.algorithms) - _VERIFIABLE_ALGORITHMS
        if unsafe or not self.algorithms:
            accepted = ", ".join(sorted(_VERIFIABLE_ALGORITHMS))
            raise TokenConfigError(f"token algorithms must be among {accepted}")


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An external identity provider whose tokens we accept under its own `iss`."""

    issuer: str
    keys: Mapping[str, PublicKey]  # by kid

    @classmethod
    def from_jwks_file(cls, path: Path, issuer: str) -> TrustedIssuer:
        """Load the provider's JWK Set; every signing key needs a plain kid and a known type."""
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TokenConfigError(f"{path}: cannot read JWK Set ({exc})") from exc
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise TokenConfigError(f"{path}: not a JWK Set (no keys list)")
        signing = [
            entry
            for entry in entries
            if isinstance(entry, dict) and entry.get("use", "sig") == "sig"
        ]
        keys = dict(_trusted_key(entry, path) for entry in signing)
        if not keys:
            raise TokenConfigError(f"{path}: no signing keys")
        return cls(issuer, MappingProxyType(keys))


def _trusted_key(entry: dict[str, Any], path: Path) -> tuple[str, PublicKey]:
    kid = entry.get("kid")
    if not is_plain_kid(kid):
        raise TokenConfigError(f"{path}: every key needs a plain kid")
    try:
        key = jwt.PyJWK(entry).key
    except jwt.PyJWTError as exc:
        raise TokenConfigError(f"{path}: key {kid}: {exc}") from exc
    public = key.public_key() if isinstance(key, PRIVATE_KEY_TYPES) else key  # keep no secret
    algorithm = algorithm_of(public)
    if algorithm is None or entry.get("alg", algorithm) != algorithm:
        raise TokenConfigError(f"{path}: key {kid}: not an accepted signing key")
    return kid, public


# ---------------------------------------------------------------------------- authority

# PyJWT's refusals, most specific first, with the detail we show (never PyJWT's own text).
_PYJWT_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.InvalidAudienceError, f"token audience is not {AUDIENCE!r}"),
    (jwt.InvalidIssuerError, "token issuer is not accepted"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "token algorithm is not accepted"),
    (jwt.exceptions.InvalidSubjectError, "token sub must be a string"),
    (jwt.exceptions.InvalidJTIError, "token jti must be a string"),
    (jwt.DecodeError, "token is malformed"),
)


def _refusal_for(exc: jwt.PyJWTError) -> InvalidToken:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return InvalidToken(f"token lacks the required claim {exc.claim!r}")
    detail = next(
        (text for kind, text in _PYJWT_REFUSALS if isinstance(exc, kind)),
        "token could not be verified",
    )
    return InvalidToken(detail)


def _shown(value: object) -> str:
    return repr(value)[:MAX_SHOWN_CHARS]


def _unverified_header(token: str, policy: TokenPolicy) -> tuple[str, str]:
    """(alg, kid) from the header, refusing every cheap-to-spot forgery before crypto work."""
    if len(token) > policy.max_token_bytes:
        raise InvalidToken(f"token is longer than {policy.max_token_bytes} bytes")
    if not _COMPACT_JWS.fullmatch(token):
        raise InvalidToken("token is not three base64url parts")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidToken("token header is malformed (not a JOSE JSON object)") from exc
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in policy.algorithms:
        raise InvalidToken(f"token algorithm {_shown(alg)} is not accepted")
    if kid is None:
        raise InvalidToken("token header has no kid")
    if not is_plain_kid(kid):
        raise InvalidToken("token kid is not a plain key id")
    return alg, kid


def _unverified_issuer(token: str) -> object:
    """The `iss` claim, read only to choose whose keys to check the signature with."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError as exc:
        raise InvalidToken("token payload is not a valid JSON object") from exc


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _claims_of(payload: dict[str, Any]) -> Claims:
    """Typed claims; PyJWT checked presence, we check shapes."""
    cnf = payload["cnf"]
    x5t = cnf.get(CNF_THUMBPRINT) if isinstance(cnf, dict) else None
    if not isinstance(x5t, str) or not x5t:
        raise InvalidToken(f"token has no cnf.{CNF_THUMBPRINT} certificate binding")
    if not all(isinstance(payload[name], str) and payload[name] for name in ("sub", "jti")):
        raise InvalidToken("token sub and jti must be non-empty strings")
    if not all(_is_number(payload[name]) for name in ("iat", "nbf", "exp")):
        raise InvalidToken("token iat, nbf and exp must be numbers")
    return Claims(
        payload["iss"],
        payload["sub"],
        int(payload["iat"]),
        int(payload["nbf"]),
        int(payload["exp"]),
        payload["jti"],
        x5t,
    )


def _check_times(claims: Claims, now: float, leeway: float) -> None:
    if claims.exp <= now - leeway:
        raise TokenExpired("token has expired")
    if claims.nbf > now + leeway:
        raise InvalidToken("token not yet valid")
    if claims.iat > now + leeway:
        raise InvalidToken("token issued in the future")


class TokenAuthority:
    """The one token issuer and verifier: our own keys plus any trusted external issuers."""

    def __init__(
        self,
        keys: SigningKeys,
        policy: TokenPolicy = TokenPolicy(),
        trusted: Sequence[TrustedIssuer] = (),
    ) -> None:
        self._keys = keys
        self._policy = policy
        self._trusted = {issuer.issuer: issuer for issuer in trusted}
        if policy.issuer in self._trusted:
            raise TokenConfigError(f"trusted issuer {policy.issuer!r} is our own issuer")
        active = algorithm_of(keys.public_key(keys.active_kid))
        if active not in policy.algorithms:
            raise TokenConfigError(
                f"active signing key is {active}, policy accepts only "
                f"{', '.join(policy.algorithms)}: rotate the key store"
            )

    def issue(self, sub: str, x5t: str, now: float) -> tuple[str, Claims]:
        """A fresh access token for `sub`, bound to the certificate thumbprint `x5t`."""
        kid, key = self._keys.signing_key()
        iat = int(now)
        claims = Claims(
            self._policy.issuer,
            sub,
            iat,
            iat,
            iat + int(self._policy.lifetime),
            secrets.token_urlsafe(JTI_BYTES),
            x5t,
        )
        payload = {
            "iss": claims.iss,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": iat,
            "nbf": iat,
            "exp": claims.exp,
            "jti": claims.jti,
            "cnf": {CNF_THUMBPRINT: x5t},
        }
        algorithm = algorithm_of(key.public_key())
        return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid}), claims

    def verify(self, token: str, now: float) -> Claims:
        """Claims of a valid token at `now`, or the refusal its defect maps to."""
        alg, kid = _unverified_header(token, self._policy)
        issuer, lookup = self._key_set(_unverified_issuer(token))
        key = lookup(kid)
        if key is None:
            raise InvalidToken("token kid names no key of its issuer")
        if algorithm_of(key) != alg:
            raise InvalidToken("token algorithm does not match its signing key")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=AUDIENCE,
                issuer=issuer,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise _refusal_for(exc) from exc
        claims = _claims_of(payload)
        _check_times(claims, now, self._policy.leeway)
        return claims

    def _key_set(self, iss: object) -> tuple[str, Callable[[str], PublicKey | None]]:
        """Whose keys may have signed a token claiming `iss`."""
        if iss == self._policy.issuer:
            return self._policy.issuer, self._keys.public_key
        trusted = self._trusted.get(iss) if isinstance(iss, str) else None
        if trusted is None:
            raise InvalidToken("token issuer is not trusted")
        return trusted.issuer, trusted.keys.get


def check_binding(claims: Claims, identity: str, x5t: str) -> None:
    """RFC 8705: a token is only good with the certificate it was issued to."""
    if claims.sub != identity:
        raise TokenCertMismatch("token subject is not the client certificate's identity")
    if claims.x5t != x5t:
        raise TokenCertMismatch(f"token is bound to another certificate (cnf.{CNF_THUMBPRINT})")
