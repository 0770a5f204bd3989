"""Certificate-bound access tokens (PROTOCOL.md §2, §3): issue, verify, and the signing keys.

How this works: `KeyStore` keeps the server's signing keys in a directory, one PKCS#8 PEM per
key (mode 0600, created with O_EXCL) and a JSON index naming the active key and when the others
were retired; the key id is the RFC 7638 thumbprint of the public key, so it is stable and safe
as a file name. `TokenAuthority.verify` refuses cheaply before any signature work (size, shape,
header JSON, `alg` allow-list, `kid` syntax, issuer, known `kid`), then lets PyJWT check the
signature with the one algorithm the looked-up key implies, and checks times against the `now`
it is given. Every refusal is an `HttpRefusal` carrying its row of the refusal table; details
never echo the token. Pure module: no trio, no clock reads in `verify`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from jwt.algorithms import get_default_algorithms
from jwt.utils import base64url_encode

from chat.errors import HttpRefusal

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | Ed25519PublicKey | rsa.RSAPublicKey
_PRIVATE_KEY_TYPES = (ec.EllipticCurvePrivateKey, Ed25519PrivateKey, rsa.RSAPrivateKey)

AUDIENCE = "chat"  # PROTOCOL.md §3: every access token names this audience
CNF_THUMBPRINT = "x5t#S256"  # RFC 8705 §3.1 confirmation member
REQUIRED_CLAIMS = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti", "cnf")  # PROTOCOL.md §3
JTI_BYTES = 16  # 128 random bits: unguessable, collision-free token ids
RSA_KEY_BITS = 3072  # NIST SP 800-57: 128-bit security, matching P-256 and Ed25519
MAX_KID_CHARS = 128  # far above a 43-char thumbprint; bounds what we compare and look up
MAX_SHOWN_CHARS = 24  # attacker-chosen header values quoted in a detail are cut to this
INDEX_NAME = "keys.json"
LOCK_NAME = ".lock"
KEY_FILE_MODE = 0o600  # private keys: owner only
KEY_DIR_MODE = 0o700

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
_KEY_GENERATORS: dict[str, Callable[[], PrivateKey]] = {
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": Ed25519PrivateKey.generate,
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS),
}


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


def _algorithm_of(key: object) -> str | None:
    """The one JWS algorithm a public key verifies, or None for a key we do not accept."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_CURVE_ALGORITHMS.get(key.curve.name)
    if isinstance(key, Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    return None


def _public_jwk(key: PublicKey) -> dict[str, Any]:
    """The public JWK members of `key`, as PyJWT writes them."""
    algorithm = _algorithm_of(key)
    if algorithm is None:
        raise TokenConfigError(f"unsupported key type {type(key).__name__}")
    return dict(get_default_algorithms()[algorithm].to_jwk(key, as_dict=True))


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): a stable, path-safe key id."""
    jwk = _public_jwk(key)
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64url_encode(hashlib.sha256(canonical).digest()).decode("ascii")


def _is_plain_kid(kid: object) -> bool:
    return isinstance(kid, str) and len(kid) <= MAX_KID_CHARS and bool(_PLAIN_KID.fullmatch(kid))


def _write_exclusive(path: Path, data: bytes, flags: int = os.O_EXCL) -> None:
    """Write a new owner-only file and flush it to disk before anyone names it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------- key store


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """One line of the key index."""

    kid: str
    algorithm: str
    created: float
    retired_at: float | None = None

    @classmethod
    def from_json(cls, entry: object) -> _KeyRecord:
        if not isinstance(entry, dict) or not _is_plain_kid(entry.get("kid")):
            raise TokenConfigError("key index entry without a plain kid")
        if entry.get("algorithm") not in _KEY_GENERATORS:
            raise TokenConfigError(f"key {entry['kid']}: unsupported algorithm")
        retired = entry.get("retired_at")
        return cls(entry["kid"], entry["algorithm"], float(entry["created"]),
                   None if retired is None else float(retired))

    def to_json(self) -> dict[str, Any]:
        return {"kid": self.kid, "algorithm": self.algorithm, "created": self.created,
                "retired_at": self.retired_at}


class KeyStore:
    """Signing keys persisted in a directory (one PEM per key, mode 0600 created with O_EXCL,
    plus a small JSON index with kid, algorithm, created, retired_at). Survives restarts:
    reopening the same directory yields the same keys. Mutations hold an flock on the
    directory, so the server and an operator command may share it."""

    def __init__(self, directory: Path, algorithm: str) -> None:
        if algorithm not in _KEY_GENERATORS:
            raise TokenConfigError(f"signing algorithm must be one of {sorted(_KEY_GENERATORS)}")
        self._dir = directory
        self._algorithm = algorithm
        self._records: list[_KeyRecord] = []
        self._private: dict[str, PrivateKey] = {}
        self._public: dict[str, PublicKey] = {}

    @classmethod
    def open(cls, directory: Path, algorithm: str = "ES256") -> KeyStore:
        """Open (or create) the key directory; creates the first key if there is none."""
        store = cls(directory, algorithm)
        directory.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
        with store._locked(exclusive=True):
            store._read()
            if not any(record.retired_at is None for record in store._records):
                store._add_key(time.time())
                store._write_index()
        return store

    @property
    def active_kid(self) -> str:
        active = [record for record in self._records if record.retired_at is None]
        return max(active, key=lambda record: record.created).kid

    def signing_key(self) -> tuple[str, PrivateKey]:
        """(kid, key) of the active key."""
        kid = self.active_kid
        return kid, self._private[kid]

    def public_key(self, kid: str) -> PublicKey | None:
        """The public key named `kid`, or None when this store has no such key."""
        return self._public.get(kid)

    def rotate(self, now: float) -> str:
        """Make a new active key; the previous one is retired at `now` but still verifies."""
        with self._locked(exclusive=True):
            self._read()
            self._records = [
                record if record.retired_at is not None else replace(record, retired_at=now)
                for record in self._records
            ]
            kid = self._add_key(now)
            self._write_index()
        return kid

    def prune(self, now: float, max_token_lifetime: float) -> list[str]:
        """Drop keys retired more than `max_token_lifetime` ago (pass lifetime + leeway)."""
        with self._locked(exclusive=True):
            self._read()
            expired = [
                record.kid for record in self._records
                if record.retired_at is not None and record.retired_at + max_token_lifetime <= now
            ]
            if expired:
                self._records = [record for record in self._records if record.kid not in expired]
                self._write_index()  # the index forgets a key before its file goes
                for kid in expired:
                    (self._dir / f"{kid}.pem").unlink(missing_ok=True)
                    del self._private[kid], self._public[kid]
        return expired

    def jwks(self) -> dict[str, Any]:
        """{"keys": [...]}: exactly the keys that still verify, each with kid, alg, use=sig."""
        return {"keys": [
            {**_public_jwk(self._public[record.kid]), "kid": record.kid,
             "alg": record.algorithm, "use": "sig"}
            for record in self._records
        ]}

    def reload(self) -> None:
        """Re-read the directory: another process may have rotated or pruned."""
        with self._locked(exclusive=False):
            self._read()

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, KEY_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> None:
        path = self._dir / INDEX_NAME
        try:
            document = json.loads(path.read_bytes())
            records = [_KeyRecord.from_json(entry) for entry in document["keys"]]
        except FileNotFoundError:
            records = []
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenConfigError(f"{path}: malformed key index ({exc})") from exc
        private = {record.kid: self._private.get(record.kid) or self._load_key(record)
                   for record in records}
        self._private = private
        self._public = {kid: key.public_key() for kid, key in private.items()}
        self._records = records

    def _load_key(self, record: _KeyRecord) -> PrivateKey:
        path = self._dir / f"{record.kid}.pem"
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise TokenConfigError(f"{path}: cannot load signing key ({exc})") from exc
        if not isinstance(key, _PRIVATE_KEY_TYPES):
            raise TokenConfigError(f"{path}: unsupported key type {type(key).__name__}")
        public = key.public_key()
        if _algorithm_of(public) != record.algorithm or jwk_thumbprint(public) != record.kid:
            raise TokenConfigError(f"{path}: key does not match its kid and algorithm")
        return key

    def _add_key(self, now: float) -> str:
        key = _KEY_GENERATORS[self._algorithm]()
        kid = jwk_thumbprint(key.public_key())
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        _write_exclusive(self._dir / f"{kid}.pem", pem)
        self._private[kid] = key
        self._public[kid] = key.public_key()
        self._records.append(_KeyRecord(kid, self._algorithm, now))
        return kid

    def _write_index(self) -> None:
        """Replace the index atomically: readers see the old or the new one, never half."""
        document = {"keys": [record.to_json() for record in self._records]}
        temporary = self._dir / f".{INDEX_NAME}.tmp"
        _write_exclusive(temporary, json.dumps(document, indent=2).encode(), os.O_TRUNC)
        os.replace(temporary, self._dir / INDEX_NAME)


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
        signing = [entry for entry in entries if isinstance(entry, dict)
                   and entry.get("use", "sig") == "sig"]
        keys = dict(_trusted_key(entry, path) for entry in signing)
        if not keys:
            raise TokenConfigError(f"{path}: no signing keys")
        return cls(issuer, MappingProxyType(keys))


def _trusted_key(entry: dict[str, Any], path: Path) -> tuple[str, PublicKey]:
    kid = entry.get("kid")
    if not _is_plain_kid(kid):
        raise TokenConfigError(f"{path}: every key needs a plain kid")
    try:
        key = jwt.PyJWK(entry).key
    except jwt.PyJWTError as exc:
        raise TokenConfigError(f"{path}: key {kid}: {exc}") from exc
    public = key.public_key() if isinstance(key, _PRIVATE_KEY_TYPES) else key  # keep no secret
    algorithm = _algorithm_of(public)
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
    detail = next((text for kind, text in _PYJWT_REFUSALS if isinstance(exc, kind)),
                  "token could not be verified")
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
    if not _is_plain_kid(kid):
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
    return Claims(payload["iss"], payload["sub"], int(payload["iat"]), int(payload["nbf"]),
                  int(payload["exp"]), payload["jti"], x5t)


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
        keys: KeyStore,
        policy: TokenPolicy = TokenPolicy(),
        trusted: Sequence[TrustedIssuer] = (),
    ) -> None:
        self._keys = keys
        self._policy = policy
        self._trusted = {issuer.issuer: issuer for issuer in trusted}
        if policy.issuer in self._trusted:
            raise TokenConfigError(f"trusted issuer {policy.issuer!r} is our own issuer")
        active = _algorithm_of(keys.public_key(keys.active_kid))
        if active not in policy.algorithms:
            raise TokenConfigError(f"active signing key is {active}, policy accepts only "
                                   f"{', '.join(policy.algorithms)}: rotate the key store")

    def issue(self, sub: str, x5t: str, now: float) -> tuple[str, Claims]:
        """A fresh access token for `sub`, bound to the certificate thumbprint `x5t`."""
        kid, key = self._keys.signing_key()
        iat = int(now)
        claims = Claims(self._policy.issuer, sub, iat, iat, iat + int(self._policy.lifetime),
                        secrets.token_urlsafe(JTI_BYTES), x5t)
        payload = {
            "iss": claims.iss, "aud": AUDIENCE, "sub": sub, "iat": iat, "nbf": iat,
            "exp": claims.exp, "jti": claims.jti, "cnf": {CNF_THUMBPRINT: x5t},
        }
        algorithm = _algorithm_of(key.public_key())
        return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid}), claims

    def verify(self, token: str, now: float) -> Claims:
        """Claims of a valid token at `now`, or the refusal its defect maps to."""
        alg, kid = _unverified_header(token, self._policy)
        issuer, lookup = self._key_set(_unverified_issuer(token))
        key = lookup(kid)
        if key is None:
            raise InvalidToken("token kid names no key of its issuer")
        if _algorithm_of(key) != alg:
            raise InvalidToken("token algorithm does not match its signing key")
        try:
            payload = jwt.decode(
                token, key, algorithms=[alg], audience=AUDIENCE, issuer=issuer,
                options={"require": list(REQUIRED_CLAIMS), "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
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
