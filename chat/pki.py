"""Make and load the certificates of the mutual-TLS deployment (PROTOCOL.md §1).

How this works: one local CA (ECDSA P-256) signs a server certificate and one client
certificate per user. A client certificate's subject CN is the user's identity, and the
SHA-256 of its DER is the `x5t#S256` thumbprint that access tokens are bound to (§3).
Revocation is a CRL signed by the same CA and loaded into the server's SSL context with
leaf CRL checking, so a revoked certificate fails the TLS handshake. Files are written whole
(`chat.store.files`), created once, never overwritten, and private keys are born 0600; the
only files ever replaced are the CRL and, on rotation, the server pair, each atomically.
Every failure is a `PkiError` whose message names the file, so a CLI can print it as one
line. Pure module: no trio.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import ssl
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from chat.protocol.wire import IDENTITY
from chat.store.files import write_atomic

# File names inside a certs directory.
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CRL = "crl.pem"

RESERVED_NAMES = {"ca": "CA", "server": "server"}  # NAME.crt/.key are already their files
DNS_NAME_RE = re.compile(r"(\*\.)?[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*")  # RFC 1123 labels
MAX_DNS_NAME = 253  # RFC 1035 §2.3.4: longest host name
MAX_CN = 64  # RFC 5280 ub-common-name
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")  # the quick start connects over loopback
CLOCK_SKEW = timedelta(minutes=5)  # backdate validity so a peer with a slow clock still accepts
CRL_DAYS = 3650  # OpenSSL rejects every client once nextUpdate passes; each revoke re-signs anyway
EXPIRY_WARNING = timedelta(days=30)  # time enough to renew before clients are refused
KEY_MODE = 0o600  # private keys: owner only
PUBLIC_MODE = 0o644  # certificates and the CRL are public
DIR_MODE = 0o700  # the certs directory holds private keys
ENCRYPTED_PEM_MARKERS = (b"ENCRYPTED PRIVATE KEY", b"Proc-Type: 4,ENCRYPTED")  # PKCS#8, legacy

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey  # what a CA may sign with (SHA-256)


class PkiError(Exception):
    """A certificate or key problem, with a one-line message meant for a human."""


class KeyPassphraseRequired(PkiError):
    """The private key is encrypted and no passphrase was given."""

    def __init__(self, path: Path, option: str = "--passphrase-env") -> None:
        super().__init__(
            f"{path} is an encrypted private key: pass its passphrase with {option} VAR"
        )
        self.path = path


class CertificateNotCurrent(PkiError):
    """A certificate past its end, or before its start: refused before any server sees it."""


class WrongPassphrase(PkiError):
    """The passphrase does not decrypt the private key."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"wrong passphrase for the encrypted private key {path}")
        self.path = path


# ---------------------------------------------------------------- making keys and certificates


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: small, fast, and spoken by every TLS 1.2/1.3 peer."""
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(
    common_name: str = "Chat Dev CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates and CRLs, nothing deeper."""
    key = generate_key()
    name = _name(common_name)
    start, end = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _base_builder(name, name, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    sans: Sequence[str],
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A serverAuth certificate for loopback plus `sans` (IP literals or DNS names)."""
    names = list(dict.fromkeys(_general_name(n) for n in (*DEFAULT_SANS, *sans)))
    common_name = sans[0] if sans else DEFAULT_SANS[0]
    san = x509.SubjectAlternativeName(names)
    return _make_leaf(ca_key, ca_cert, common_name, days, ExtendedKeyUsageOID.SERVER_AUTH, san)


def make_client_cert(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    name: str,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A clientAuth certificate whose subject CN `name` is the user's identity."""
    _check_client_name(name)
    return _make_leaf(ca_key, ca_cert, name, days, ExtendedKeyUsageOID.CLIENT_AUTH)


def make_crl(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    revoked: Sequence[x509.RevokedCertificate] = (),
    number: int = 1,
) -> x509.CertificateRevocationList:
    """A CRL listing `revoked`, signed by the CA; `number` grows with each re-issue."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256())


def _make_leaf(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and its end-entity certificate, never outliving the CA."""
    key = generate_key()
    start, end = _validity(days, ca_cert.not_valid_after_utc)
    builder = (
        _base_builder(_name(common_name), ca_cert.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    start: datetime,
    end: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _name(common_name: str) -> x509.Name:
    if not 1 <= len(common_name) <= MAX_CN:
        raise PkiError(f"common name must be 1 to {MAX_CN} characters: {common_name!r}")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, limit: datetime | None = None) -> tuple[datetime, datetime]:
    if days < 1:
        raise PkiError(f"validity must be at least 1 day, not {days}")
    now = datetime.now(UTC)
    end = now + timedelta(days=days)
    return now - CLOCK_SKEW, end if limit is None else min(end, limit)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_issuer_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _general_name(name: str) -> x509.GeneralName:
    """An IP literal becomes an IPAddress SAN, anything else must be a host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > MAX_DNS_NAME or not DNS_NAME_RE.fullmatch(name):
        raise PkiError(f"not a host name or IP address: {name!r}")
    return x509.DNSName(name.lower())


def _check_client_name(name: str) -> None:
    if not IDENTITY.fullmatch(name):
        raise PkiError(f"client name must be 1-64 of A-Z a-z 0-9 _ . @ -: {name!r}")


# ---------------------------------------------------------------- files


def write_private_key(
    path: Path, key: PrivateKeyTypes, passphrase: bytes | None = None, *, replace: bool = False
) -> None:
    """Write `key` as PKCS#8 PEM, born 0600, encrypted when a passphrase is given; an
    existing file is an error unless `replace` (then it is swapped atomically)."""
    if passphrase is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    elif not passphrase:
        raise PkiError(f"refusing to encrypt {path} with an empty passphrase")
    else:
        encryption = serialization.BestAvailableEncryption(passphrase)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    _write(Path(path), pem, KEY_MODE, replace=replace)


def write_certificate(path: Path, cert: x509.Certificate, *, replace: bool = False) -> None:
    """Write `cert` as PEM: a new file, or with `replace` an atomic swap of the old one."""
    _write(Path(path), cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, replace=replace)


def write_crl(path: Path, crl: x509.CertificateRevocationList, *, replace: bool = False) -> None:
    """Write `crl` as PEM: a new file, or with `replace` an atomic swap of the old one."""
    _write(Path(path), crl.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, replace=replace)


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate in a PEM (or DER) file."""
    data = _read(Path(path))
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path} is not a certificate (PEM or DER)") from None


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKeyTypes:
    """A PEM private key, with a distinct error for a missing and for a wrong passphrase."""
    path = Path(path)
    data = _read(path)
    encrypted = any(marker in data for marker in ENCRYPTED_PEM_MARKERS)
    if encrypted and passphrase is None:
        raise KeyPassphraseRequired(path)
    if not encrypted and passphrase is not None and b"PRIVATE KEY-----" in data:
        raise PkiError(f"{path} is not encrypted, yet a passphrase was given")
    try:
        return serialization.load_pem_private_key(data, passphrase)
    except ValueError:
        if encrypted:
            raise WrongPassphrase(path) from None
        raise PkiError(f"{path} is not a PEM private key") from None
    except (TypeError, UnsupportedAlgorithm):
        raise PkiError(f"{path} is not a supported PEM private key") from None


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """A PEM CRL, checked to be signed by `ca_cert` (else OpenSSL would reject every client)."""
    data = _read(Path(path))
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate revocation list") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(_issuer_public_key(ca_cert)):
        raise PkiError(f"{path} is not signed by the CA {identity_or_dn(ca_cert)}")
    return crl


def revoked_serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    """The serial numbers `crl` revokes: what a server checks its live connections against."""
    return frozenset(entry.serial_number for entry in crl)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file") from None
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path, data: bytes, mode: int, *, replace: bool = False) -> None:
    """Write `path` whole or not at all, born with `mode`; an existing file is an error
    unless `replace` (then it is swapped atomically: a reader never sees half a file)."""
    try:
        write_atomic(path, data, mode=mode, exclusive=not replace)
    except FileExistsError:
        raise PkiError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror}") from None


# ---------------------------------------------------------------- identity


def identity_of(cert: x509.Certificate) -> str:
    """The identity a certificate carries: its subject Common Name."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError(f"certificate subject {cert.subject.rfc4514_string()!r} has no single CN")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def client_identity(der: bytes) -> str:
    """The identity of a client certificate (PROTOCOL.md §9): exactly one CN, 1-64 of
    `[A-Za-z0-9_.@-]`. Otherwise a PkiError whose message is plain ASCII, so neither a
    control character nor a look-alike letter of the CN can reach a log line."""
    try:
        with warnings.catch_warnings():  # cryptography warns of an over-long CN: refused below
            warnings.simplefilter("ignore", UserWarning)
            names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
    except ValueError as exc:
        raise PkiError(f"unreadable client certificate: {ascii(str(exc))}") from None
    if len(names) != 1:
        raise PkiError(f"client certificate has {len(names)} CNs, not exactly one")
    value = names[0].value
    if not isinstance(value, str) or not IDENTITY.fullmatch(value):
        shown = ascii(value)[:80]
        raise PkiError(f"client certificate CN {shown} is not 1-64 of A-Z a-z 0-9 _ . @ -")
    return value


def identity_or_dn(cert: x509.Certificate) -> str:
    """The CN when there is one, else the whole subject: for messages."""
    try:
        return identity_of(cert)
    except PkiError:
        return cert.subject.rfc4514_string()


def thumbprint(der: bytes) -> str:
    """`x5t#S256` (RFC 8705 §3.1): base64url without padding of SHA-256 over the DER."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def serial_of(der: bytes) -> int:
    """The serial number of a certificate `client_identity` accepted: its key in a CRL."""
    return x509.load_der_x509_certificate(der).serial_number


def san_strings(cert: x509.Certificate) -> list[str]:
    """The host names and IP addresses a certificate names, as text (none: empty)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san]


def expiry_warning(cert: x509.Certificate, path: Path, now: datetime) -> str | None:
    """A line for a human when `cert` ends within EXPIRY_WARNING of `now` (or has ended)."""
    end = cert.not_valid_after_utc
    if end - now > EXPIRY_WARNING:
        return None
    if end < now:
        return f"{path} expired on {_when(end)}"
    return f"{path} expires on {_when(end)}, in {(end - now).days} days"


# ---------------------------------------------------------------- SSL contexts


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's SSL context and the client serials its CRL revokes (none without a CRL)."""

    context: ssl.SSLContext
    revoked: frozenset[int]
    trusted: Store  # the CA bundle, for client certificates checked outside TLS (behind a proxy)


def server_tls(
    cert: Path,
    key: Path,
    ca: Path,
    crl: Path | None = None,
    passphrase: bytes | None = None,
) -> ServerTls:
    """A TLS >= 1.2 server context that requires a client certificate chaining to `ca`.

    With an existing `crl`, a revoked client certificate fails the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca_cert = _trust(ctx, Path(ca))
    trusted = Store(x509.load_pem_x509_certificates(_read(Path(ca))))
    _present(ctx, Path(cert), Path(key), passphrase)
    if crl is None or not Path(crl).exists():
        return ServerTls(ctx, frozenset(), trusted)
    revoked = revoked_serials(load_crl(Path(crl), ca_cert))
    with _openssl_refusal(Path(crl)):
        ctx.load_verify_locations(cafile=str(crl))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ServerTls(ctx, revoked, trusted)


def verify_client(cert: x509.Certificate, tls: ServerTls, now: datetime) -> None:
    """What the TLS handshake checks of a client certificate, for one that arrived some other
    way (a proxy's header): it chains to the CA bundle, is valid at `now`, is for clientAuth
    and is not revoked. Otherwise a PkiError saying which. Our client certificates carry no
    SAN, which the web PKI profile of `cryptography` demands by default: here it may be absent."""
    end_entity = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(tls.trusted)
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=end_entity)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise PkiError(f"client certificate refused: {ascii(str(exc))}") from None
    if cert.serial_number in tls.revoked:
        raise PkiError(f"client certificate {cert.serial_number:x} is revoked by the CRL")


def server_ssl_context(
    cert: Path,
    key: Path,
    ca: Path,
    crl: Path | None = None,
    passphrase: bytes | None = None,
) -> ssl.SSLContext:
    """The context of `server_tls`, for a server that never re-checks live connections."""
    return server_tls(cert, key, ca, crl, passphrase).context


def client_ssl_context(
    cert: Path, key: Path, ca: Path, passphrase: bytes | None = None
) -> ssl.SSLContext:
    """TLS >= 1.2 client context: checks the server against `ca` and its host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _trust(ctx, Path(ca))
    _present(ctx, Path(cert), Path(key), passphrase)
    return ctx


def _trust(ctx: ssl.SSLContext, ca: Path) -> x509.Certificate:
    ca_cert = load_certificate(ca)
    with _openssl_refusal(ca):
        ctx.load_verify_locations(cafile=str(ca))
    return ca_cert


def _present(ctx: ssl.SSLContext, cert: Path, key: Path, passphrase: bytes | None) -> None:
    """Load our certificate and key, checking them first so errors name the file."""
    certificate = load_certificate(cert)
    check_current(certificate, cert, datetime.now(UTC))
    private_key = load_private_key(key, passphrase)
    if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
        raise PkiError(f"{key} is not the private key of {cert}")
    with _openssl_refusal(key):
        ctx.load_cert_chain(str(cert), str(key), password=passphrase)


def check_current(cert: x509.Certificate, path: Path, now: datetime) -> None:
    """Refuse a certificate outside its validity period: every server would refuse it."""
    renew = (
        "make a new one with `chat-certs rotate-server`"
        if path.stem == SERVER_CERT.removesuffix(".crt")
        else f"make a new one with `chat-certs client {path.stem} --force`"
    )
    if now > cert.not_valid_after_utc:
        raise CertificateNotCurrent(f"{path} expired on {_when(cert.not_valid_after_utc)}; {renew}")
    if now < cert.not_valid_before_utc:
        raise CertificateNotCurrent(
            f"{path} is not valid before {_when(cert.not_valid_before_utc)}; check this "
            "computer's clock"
        )


def rejection_cause(cert_path: Path, ca_path: Path) -> str | None:
    """Why a server trusting `ca_path` (and the CRL beside it) refuses `cert_path`, when the
    files here tell: another CA issued it, or the CRL lists it. None when they do not."""
    try:
        cert, ca_cert = load_certificate(cert_path), load_certificate(ca_path)
    except PkiError:
        return None
    try:
        _check_issued_by(cert, ca_cert, cert_path)
    except PkiError as exc:
        return str(exc)
    crl_path = DevPki.at(Path(ca_path).parent).crl
    try:
        crl = load_crl(crl_path, ca_cert)
    except PkiError:  # none here, or not this CA's: it tells nothing
        return None
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return None
    return f"{cert_path} is revoked: {crl_path} lists it since {_when(entry.revocation_date_utc)}"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


@contextmanager
def _openssl_refusal(path: Path) -> Iterator[None]:
    """Turn OpenSSL's complaint about a file into a PkiError naming it."""
    try:
        yield
    except ssl.SSLError as exc:
        raise PkiError(f"OpenSSL refused {path}: {exc.reason or exc}") from None


def _issuer_public_key(ca_cert: x509.Certificate) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise PkiError(f"CA {identity_or_dn(ca_cert)}: its key must be ECDSA or RSA")
    return key


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------- a certs directory


@dataclass(frozen=True, slots=True)
class DevPki:
    """The file layout of a certs directory: CA, server pair, CRL and NAME.crt/NAME.key."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    crl: Path

    @classmethod
    def at(cls, directory: Path) -> DevPki:
        """The layout rooted at `directory` (nothing is read or created)."""
        d = Path(directory)
        return cls(d, d / CA_CERT, d / SERVER_CERT, d / SERVER_KEY, d / CRL)

    @property
    def ca_key(self) -> Path:
        """The CA's private key; only needed to sign certificates and CRLs."""
        return self.directory / CA_KEY

    def client(self, name: str) -> tuple[Path, Path]:
        """(`<dir>/NAME.crt`, `<dir>/NAME.key`) for a valid, non-reserved client name."""
        _check_client_name(name)
        if name in RESERVED_NAMES:
            owner = RESERVED_NAMES[name]
            raise PkiError(f"client name {name!r} is reserved: {name}.crt/.key are the {owner}'s")
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"


def load_ca(pki: DevPki, passphrase: bytes | None = None) -> tuple[SigningKey, x509.Certificate]:
    """The CA key and certificate of a certs directory, checked to belong together."""
    cert = load_certificate(pki.ca)
    key = load_private_key(pki.ca_key, passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{pki.ca_key}: a CA key must be ECDSA or RSA")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise PkiError(f"{pki.ca_key} is not the private key of {pki.ca}")
    return key, cert


def revoke(directory: Path, name: str, passphrase: bytes | None = None) -> int:
    """Add `<dir>/NAME.crt` to `<dir>/crl.pem`, re-signed by the CA; returns its serial."""
    pki = DevPki.at(Path(directory))
    crt, _ = pki.client(name)
    cert = load_certificate(crt)
    ca_key, ca_cert = load_ca(pki, passphrase)
    _check_issued_by(cert, ca_cert, crt)
    old = load_crl(pki.crl, ca_cert) if pki.crl.exists() else None
    entries = list(old) if old is not None else []
    if all(entry.serial_number != cert.serial_number for entry in entries):
        entries.append(_revoked_entry(cert.serial_number))
    crl = make_crl(ca_key, ca_cert, entries, _crl_number(old) + 1)
    write_crl(pki.crl, crl, replace=True)
    return cert.serial_number


def rotate_server(
    pki: DevPki,
    ca: tuple[SigningKey, x509.Certificate],
    sans: Sequence[str] | None = None,
    days: int = 825,
    passphrase: bytes | None = None,
) -> x509.Certificate:
    """Replace the server pair with a new one signed by `ca`, for `sans` (default: the names
    of the current certificate); a running server picks it up when the files change.

    `passphrase` must open the current key: the running server loads the new key with the
    passphrase it was started with. The key is swapped first, then the certificate.
    """
    current = load_certificate(pki.server_cert)
    load_private_key(pki.server_key, passphrase)
    key, cert = make_server_cert(*ca, _names_of(current) if sans is None else sans, days)
    write_private_key(pki.server_key, key, passphrase, replace=True)
    write_certificate(pki.server_cert, cert, replace=True)
    return cert


def _names_of(cert: x509.Certificate) -> list[str]:
    """Its names beyond DEFAULT_SANS, the CN first (`make_server_cert` takes it from there)."""
    names = [name for name in san_strings(cert) if name not in DEFAULT_SANS]
    common_name = identity_or_dn(cert)
    return sorted(names, key=lambda name: name != common_name)


def _check_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, path: Path) -> None:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{path} was not issued by the CA {identity_or_dn(ca_cert)}") from None


def _revoked_entry(serial: int) -> x509.RevokedCertificate:
    return (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(datetime.now(UTC))
        .build()
    )


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def ensure_dev_pki(
    directory: Path, clients: Sequence[str] = ("alice", "bob"), passphrase: bytes | None = None
) -> tuple[DevPki, list[Path]]:
    """Create whatever of CA, CRL, server pair and client pairs is missing; touch nothing else.

    Returns the layout and the files created (empty when all were there). The CA key is
    read only when something must be signed, so a complete directory may keep it encrypted
    or elsewhere: serving needs only ca.crt and the server pair, so without ca.key the
    missing client pairs and CRL are not made (no certificate can have been revoked, and
    clients are made where the CA key is). `passphrase` is the server key's (`--passphrase-env`):
    it opens an encrypted ca.key and encrypts a new ca.key and server.key, as
    `chat-certs init --passphrase-env` does; client keys stay plain.
    """
    pki = DevPki.at(Path(directory))
    pairs: list[tuple[Path, Path, str | None]] = [(pki.server_cert, pki.server_key, None)]
    pairs += [(*pki.client(name), name) for name in clients]
    for crt, key, _ in pairs:
        _check_pair(crt, key)
    if pki.ca_key.exists() and not pki.ca.exists():
        raise PkiError(f"{pki.ca_key} exists but {pki.ca} is missing; restore it or remove both")
    pending = [(crt, key, name) for crt, key, name in pairs if not crt.exists()]
    if pki.ca.exists() and not pki.ca_key.exists():
        if not pki.server_cert.exists():
            raise PkiError(
                f"{pki.ca_key} is missing: it is needed to create {pki.server_cert}; restore "
                "it, or make the server certificate with chat-certs where the CA key is"
            )
        return pki, []
    if pki.ca.exists() and pki.crl.exists() and not pending:
        return pki, []
    created: list[Path] = []
    ca_key, ca_cert = _ensure_ca(pki, created, passphrase)
    if not pki.crl.exists():
        write_crl(pki.crl, make_crl(ca_key, ca_cert))
        created.append(pki.crl)
    for crt, key, name in pending:
        issued = (
            make_server_cert(ca_key, ca_cert, ())
            if name is None
            else make_client_cert(ca_key, ca_cert, name)
        )
        write_private_key(key, issued[0], passphrase if name is None else None)
        write_certificate(crt, issued[1])
        created += [crt, key]
    return pki, created


def _ensure_ca(
    pki: DevPki, created: list[Path], passphrase: bytes | None
) -> tuple[SigningKey, x509.Certificate]:
    if pki.ca.exists():
        encrypted = any(marker in _read(pki.ca_key) for marker in ENCRYPTED_PEM_MARKERS)
        return load_ca(pki, passphrase if encrypted else None)
    try:
        pki.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {pki.directory}: {exc.strerror}") from None
    key, cert = make_ca()
    write_private_key(pki.ca_key, key, passphrase)
    write_certificate(pki.ca, cert)
    created += [pki.ca, pki.ca_key]
    return key, cert


def _check_pair(crt: Path, key: Path) -> None:
    """A certificate without its key (or the reverse) is a broken directory, not ours to fix."""
    if crt.exists() != key.exists():
        present, missing = (crt, key) if crt.exists() else (key, crt)
        raise PkiError(f"{present} exists but {missing} is missing; restore it or remove both")
