"""Certificates made by chat.pki, checked by real TLS handshakes over loopback."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chat import pki
from chat.pki import DevPki, KeyPassphraseRequired, PkiError, WrongPassphrase

TIMEOUT = 5.0  # a loopback handshake takes milliseconds; this only bounds a broken test


@dataclass(frozen=True, slots=True)
class Outcome:
    """What each side of one handshake saw."""

    server_error: OSError | None
    client_error: OSError | None
    peer_der: bytes | None


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str = "localhost"
) -> Outcome:
    """One TLS handshake over loopback; the server greets with b"ok" once it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["der"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except OSError as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    client_error = None
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            if tls.recv(2) != b"ok":  # TLS 1.3: a refused client cert shows up on first read
                raise ConnectionResetError("server closed without greeting")
    except OSError as exc:
        client_error = exc
    thread.join(TIMEOUT)
    listener.close()
    return Outcome(seen.get("error"), client_error, seen.get("der"))


def write_pair(
    directory: Path, stem: str, key: PrivateKeyTypes, cert: x509.Certificate
) -> tuple[Path, Path]:
    crt, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    pki.write_private_key(key_path, key)
    pki.write_certificate(crt, cert)
    return crt, key_path


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """A complete certs directory shared by the read-only tests."""
    layout, _ = pki.ensure_dev_pki(tmp_path_factory.mktemp("certs"))
    return layout


def contexts(dev: DevPki, name: str = "alice") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    crt, key = dev.client(name)
    server = pki.server_ssl_context(dev.server_cert, dev.server_key, dev.ca, dev.crl)
    return server, pki.client_ssl_context(crt, key, dev.ca)


def assert_verify_failed(outcome: Outcome, message: str) -> None:
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError)
    assert outcome.server_error.verify_message == message
    assert outcome.client_error is not None
    assert outcome.peer_der is None


# ---------------------------------------------------------------- handshakes


def test_mutual_tls_handshake_gives_server_the_client_identity(dev: DevPki) -> None:
    server, client = contexts(dev)
    for ctx in (server, client):  # our certificates meet OpenSSL's strict RFC 5280 checks
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    outcome = handshake(server, client)
    assert outcome.server_error is None and outcome.client_error is None
    assert outcome.peer_der is not None
    peer = x509.load_der_x509_certificate(outcome.peer_der)
    assert pki.identity_of(peer) == "alice"
    alice = pki.load_certificate(dev.client("alice")[0])
    assert pki.thumbprint(outcome.peer_der) == pki.thumbprint(alice.public_bytes(Encoding.DER))


def test_tls_version_floor_is_1_2(dev: DevPki) -> None:
    server, client = contexts(dev)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_handshake_fails_without_client_certificate(dev: DevPki) -> None:
    server, _ = contexts(dev)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=str(dev.ca))
    outcome = handshake(server, bare)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert outcome.server_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert outcome.client_error is not None


def test_handshake_fails_with_client_certificate_from_foreign_ca(
    dev: DevPki, tmp_path: Path
) -> None:
    foreign_key, foreign_ca = pki.make_ca("Someone Else's CA")
    crt, key = write_pair(
        tmp_path, "alice", *pki.make_client_cert(foreign_key, foreign_ca, "alice")
    )
    server, _ = contexts(dev)
    outcome = handshake(server, pki.client_ssl_context(crt, key, dev.ca))
    assert_verify_failed(outcome, "unable to get local issuer certificate")


def test_handshake_fails_with_expired_client_certificate(dev: DevPki, tmp_path: Path) -> None:
    ca_key, ca_cert = pki.load_ca(dev)
    key = pki.generate_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, key_path = write_pair(tmp_path, "alice", key, cert)
    with pytest.raises(pki.CertificateNotCurrent, match="expired on"):
        pki.client_ssl_context(crt, key_path, dev.ca)  # ours refuses before any handshake
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # another client would present it
    client.load_verify_locations(cafile=str(dev.ca))
    client.load_cert_chain(str(crt), str(key_path))
    server, _ = contexts(dev)
    assert_verify_failed(handshake(server, client), "certificate has expired")


def test_revoked_client_fails_handshake_and_others_still_pass(tmp_path: Path) -> None:
    layout, _ = pki.ensure_dev_pki(tmp_path / "certs")
    serial = pki.revoke(layout.directory, "alice")
    assert serial == pki.load_certificate(layout.client("alice")[0]).serial_number
    server, alice = contexts(layout, "alice")
    assert_verify_failed(handshake(server, alice), "certificate revoked")
    _, bob = contexts(layout, "bob")
    assert handshake(server, bob).server_error is None


def test_client_checks_server_host_name(dev: DevPki) -> None:
    server, client = contexts(dev)
    assert handshake(server, client, host="127.0.0.1").client_error is None
    outcome = handshake(server, client, host="chat.example.org")
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "mismatch" in outcome.client_error.verify_message


def test_client_rejects_server_from_foreign_ca(dev: DevPki, tmp_path: Path) -> None:
    foreign_key, foreign_ca = pki.make_ca("Someone Else's CA")
    crt, key = write_pair(tmp_path, "server", *pki.make_server_cert(foreign_key, foreign_ca, ()))
    foreign_ca_path = tmp_path / "foreign-ca.crt"
    pki.write_certificate(foreign_ca_path, foreign_ca)
    _, client = contexts(dev)
    server = pki.server_ssl_context(crt, key, dev.ca)
    outcome = handshake(server, client)
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert outcome.client_error.verify_message == "unable to get local issuer certificate"


def test_encrypted_server_key_works_with_its_passphrase(dev: DevPki, tmp_path: Path) -> None:
    ca_key, ca_cert = pki.load_ca(dev)
    key, cert = pki.make_server_cert(ca_key, ca_cert, ())
    pki.write_private_key(tmp_path / "server.key", key, b"correct horse")
    pki.write_certificate(tmp_path / "server.crt", cert)
    server = pki.server_ssl_context(
        tmp_path / "server.crt", tmp_path / "server.key", dev.ca, dev.crl, b"correct horse"
    )
    _, client = contexts(dev)
    assert handshake(server, client).server_error is None


# ---------------------------------------------------------------- passphrases and loading


@pytest.fixture
def encrypted_key(tmp_path: Path) -> Path:
    path = tmp_path / "secret.key"
    pki.write_private_key(path, pki.generate_key(), b"s3cret")
    return path


def test_encrypted_key_without_passphrase_says_how_to_pass_it(encrypted_key: Path) -> None:
    with pytest.raises(KeyPassphraseRequired) as info:
        pki.load_private_key(encrypted_key)
    assert str(encrypted_key) in str(info.value)
    assert "--passphrase-env VAR" in str(info.value)


def test_encrypted_key_with_wrong_passphrase(encrypted_key: Path) -> None:
    with pytest.raises(WrongPassphrase, match="secret.key"):
        pki.load_private_key(encrypted_key, b"guess")


def test_encrypted_key_with_right_passphrase(encrypted_key: Path) -> None:
    key = pki.load_private_key(encrypted_key, b"s3cret")
    assert key.public_key() is not None


def test_server_context_with_encrypted_key_and_no_passphrase_raises(
    dev: DevPki, encrypted_key: Path
) -> None:
    with pytest.raises(KeyPassphraseRequired):
        pki.server_ssl_context(dev.server_cert, encrypted_key, dev.ca)


def test_passphrase_for_plain_key_is_refused(dev: DevPki) -> None:
    with pytest.raises(PkiError, match="not encrypted"):
        pki.load_private_key(dev.server_key, b"s3cret")


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="empty passphrase"):
        pki.write_private_key(tmp_path / "k.key", pki.generate_key(), b"")
    assert not (tmp_path / "k.key").exists()


def test_private_key_is_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    pki.write_private_key(path, pki.generate_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_files_are_never_overwritten(dev: DevPki) -> None:
    before = dev.ca.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        pki.write_certificate(dev.ca, pki.make_ca()[1])
    with pytest.raises(PkiError, match="already exists"):
        pki.write_private_key(dev.ca_key, pki.generate_key())
    assert dev.ca.read_bytes() == before


def test_loading_missing_or_garbage_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="nope.crt: no such file"):
        pki.load_certificate(tmp_path / "nope.crt")
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(PkiError, match="garbage.crt is not a certificate"):
        pki.load_certificate(garbage)
    with pytest.raises(PkiError, match="garbage.crt is not a PEM private key"):
        pki.load_private_key(garbage)


def test_mismatched_key_and_certificate_are_refused(dev: DevPki) -> None:
    alice_key = dev.client("alice")[1]
    with pytest.raises(PkiError, match="is not the private key of"):
        pki.server_ssl_context(dev.server_cert, alice_key, dev.ca)


def test_crl_from_another_ca_is_refused(dev: DevPki, tmp_path: Path) -> None:
    foreign_key, foreign_ca = pki.make_ca("Someone Else's CA")
    crl = tmp_path / "crl.pem"
    pki.write_crl(crl, pki.make_crl(foreign_key, foreign_ca))
    with pytest.raises(PkiError, match="is not signed by the CA"):
        pki.server_ssl_context(dev.server_cert, dev.server_key, dev.ca, crl)


# ---------------------------------------------------------------- certificate contents


def test_thumbprint_is_base64url_sha256_without_padding(dev: DevPki) -> None:
    assert pki.thumbprint(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
    der = pki.load_certificate(dev.client("alice")[0]).public_bytes(Encoding.DER)
    by_hand = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert pki.thumbprint(der) == by_hand
    assert len(by_hand) == 43 and "=" not in by_hand


def test_server_certificate_names_and_usage() -> None:
    ca_key, ca_cert = pki.make_ca()
    _, cert = pki.make_server_cert(ca_key, ca_cert, ["chat.example", "10.1.2.3", "localhost"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "chat.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca_cert)


def test_bad_server_name_is_refused() -> None:
    ca_key, ca_cert = pki.make_ca()
    with pytest.raises(PkiError, match="not a host name"):
        pki.make_server_cert(ca_key, ca_cert, ["bad name"])


def test_client_certificate_identity_and_usage() -> None:
    ca_key, ca_cert = pki.make_ca()
    key, cert = pki.make_client_cert(ca_key, ca_cert, "carol@example.org", days=7)
    assert pki.identity_of(cert) == "carol@example.org"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=7)
    assert isinstance(key.curve, type(pki.generate_key().curve))


@pytest.mark.parametrize("name", ["", "a b", "x/y", "é", "a" * 65, "semi;colon"])
def test_invalid_client_names_are_refused(name: str) -> None:
    ca_key, ca_cert = pki.make_ca()
    with pytest.raises(PkiError, match="client name"):
        pki.make_client_cert(ca_key, ca_cert, name)


@pytest.mark.parametrize("name", ["ca", "server"])
def test_reserved_client_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="reserved"):
        DevPki.at(tmp_path).client(name)


def test_validity_must_be_positive() -> None:
    with pytest.raises(PkiError, match="at least 1 day"):
        pki.make_ca(days=0)


# ---------------------------------------------------------------- ensure_dev_pki and revoke


def test_ensure_dev_pki_creates_missing_files_only(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    layout, created = pki.ensure_dev_pki(directory)
    names = {p.name for p in created}
    assert names == {
        "ca.crt", "ca.key", "crl.pem", "server.crt", "server.key",
        "alice.crt", "alice.key", "bob.crt", "bob.key",
    }  # fmt: skip
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    snapshot = {p: p.read_bytes() for p in directory.iterdir()}
    assert pki.ensure_dev_pki(directory)[1] == []
    _, more = pki.ensure_dev_pki(directory, ["alice", "carol"])
    assert more == list(layout.client("carol"))
    assert all(p.read_bytes() == data for p, data in snapshot.items())


def test_ensure_dev_pki_refuses_half_a_pair(tmp_path: Path) -> None:
    layout, _ = pki.ensure_dev_pki(tmp_path)
    layout.server_key.unlink()
    with pytest.raises(PkiError, match="server.key is missing"):
        pki.ensure_dev_pki(tmp_path)


def test_complete_directory_never_needs_the_ca_key(tmp_path: Path) -> None:
    layout, _ = pki.ensure_dev_pki(tmp_path, ["alice"])
    layout.ca_key.write_bytes(b"unreadable now")
    assert pki.ensure_dev_pki(tmp_path, ["alice"])[1] == []


def test_revoke_is_idempotent_and_renumbers_the_crl(tmp_path: Path) -> None:
    layout, _ = pki.ensure_dev_pki(tmp_path)
    _, ca_cert = pki.load_ca(layout)
    serials = [
        pki.revoke(tmp_path, "alice"),
        pki.revoke(tmp_path, "alice"),
        pki.revoke(tmp_path, "bob"),
    ]
    crl = pki.load_crl(layout.crl, ca_cert)
    assert sorted(entry.serial_number for entry in crl) == sorted(set(serials))
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4
    assert stat.S_IMODE(layout.crl.stat().st_mode) == 0o644


def test_revoke_refuses_a_certificate_from_another_ca(tmp_path: Path) -> None:
    layout, _ = pki.ensure_dev_pki(tmp_path, [])
    foreign_key, foreign_ca = pki.make_ca("Someone Else's CA")
    write_pair(tmp_path, "mallory", *pki.make_client_cert(foreign_key, foreign_ca, "mallory"))
    with pytest.raises(PkiError, match="was not issued by the CA"):
        pki.revoke(tmp_path, "mallory")


def test_revoke_unknown_client_names_the_file(tmp_path: Path) -> None:
    pki.ensure_dev_pki(tmp_path, [])
    with pytest.raises(PkiError, match="zed.crt: no such file"):
        pki.revoke(tmp_path, "zed")


def test_revoke_with_encrypted_ca_key(tmp_path: Path) -> None:
    ca_key, ca_cert = pki.make_ca()
    layout = DevPki.at(tmp_path)
    pki.write_private_key(layout.ca_key, ca_key, b"ca pass")
    pki.write_certificate(layout.ca, ca_cert)
    write_pair(tmp_path, "alice", *pki.make_client_cert(ca_key, ca_cert, "alice"))
    with pytest.raises(KeyPassphraseRequired):
        pki.revoke(tmp_path, "alice")
    with pytest.raises(WrongPassphrase):
        pki.revoke(tmp_path, "alice", b"nope")
    assert pki.revoke(tmp_path, "alice", b"ca pass") > 0


def test_server_tls_names_the_serials_its_crl_revokes(tmp_path: Path) -> None:
    layout, _ = pki.ensure_dev_pki(tmp_path / "certs", ("alice", "bob"))
    files = (layout.server_cert, layout.server_key, layout.ca, layout.crl)
    assert pki.server_tls(*files).revoked == frozenset()
    serial = pki.revoke(layout.directory, "bob")
    assert pki.server_tls(*files).revoked == {serial}
    assert pki.server_tls(*files[:3]).revoked == frozenset()  # no CRL, nothing revoked
    der = pki.load_certificate(layout.client("bob")[0]).public_bytes(Encoding.DER)
    assert pki.serial_of(der) == serial


def test_expiry_warning_within_30_days(dev: DevPki) -> None:
    cert = pki.load_certificate(dev.server_cert)
    end = cert.not_valid_after_utc
    assert pki.expiry_warning(cert, dev.server_cert, end - timedelta(days=31)) is None
    soon = pki.expiry_warning(cert, dev.server_cert, end - timedelta(days=30))
    assert soon == f"{dev.server_cert} expires on {end:%Y-%m-%d %H:%M} UTC, in 30 days"
    gone = pki.expiry_warning(cert, dev.server_cert, end + timedelta(seconds=1))
    assert gone == f"{dev.server_cert} expired on {end:%Y-%m-%d %H:%M} UTC"


def test_an_expired_certificate_names_the_command_that_renews_it(dev: DevPki) -> None:
    cert = pki.load_certificate(dev.server_cert)
    later = cert.not_valid_after_utc + timedelta(days=1)
    with pytest.raises(pki.CertificateNotCurrent, match="`chat-certs rotate-server`"):
        pki.check_current(cert, dev.server_cert, later)
    with pytest.raises(pki.CertificateNotCurrent, match="`chat-certs client alice --force`"):
        pki.check_current(cert, dev.directory / "alice.crt", later)
