"""PROTOCOL.md §9, last point: a client certificate without exactly one CN of 1-64
`[A-Za-z0-9_.@-]` is closed right after the TLS handshake, before any HTTP byte is
answered, with one plain-ASCII log line naming the reason; never a traceback."""

from __future__ import annotations

import logging
import ssl
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chat import pki as pki_module
from tests.conftest import RunningServer, TestPki

CN = NameOID.COMMON_NAME
with warnings.catch_warnings():  # cryptography warns of the two it is told not to check
    warnings.simplefilter("ignore", UserWarning)
    ODD_SUBJECTS = {
        "no CN": ([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")], "has 0 CNs"),
        "two CNs": ([x509.NameAttribute(CN, "alice"), x509.NameAttribute(CN, "bob")], "has 2 CNs"),
        "CR LF": ([x509.NameAttribute(CN, "alice\r\nX-Admin: 1")], r"CN 'alice\r\nX-Admin: 1'"),
        "look-alike": ([x509.NameAttribute(CN, "\u0430lice")], r"CN '\u0430lice'"),  # Cyrillic a
        "space": ([x509.NameAttribute(CN, "al ice")], "CN 'al ice'"),
        # cryptography refuses to build these two unless told not to check
        "too long": ([x509.NameAttribute(CN, "a" * 65, _validate=False)], "CN 'aaaa"),
        "empty": ([x509.NameAttribute(CN, "", _validate=False)], "CN ''"),
    }


def _odd_client(pki: TestPki, tmp_path: Path, subject: list[x509.NameAttribute]) -> ssl.SSLContext:
    """A client certificate our CA signed, with `subject` as its subject (chat-certs refuses
    to make such a one, so it is built here)."""
    ca_key, ca_cert = pki_module.load_ca(pki_module.DevPki.at(pki.dir))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, pem_key = tmp_path / "odd.crt", tmp_path / "odd.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki_module.client_ssl_context(crt, pem_key, pki.ca)


async def _answer_to_a_request(server: RunningServer, context: ssl.SSLContext) -> bytes:
    """Whatever the server sends back to `GET /healthz` before it closes."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=context)
    received = bytearray()
    try:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        while data := await stream.receive_some(4096):
            received += data
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return bytes(received)


@pytest.mark.parametrize("case", ODD_SUBJECTS)
async def test_a_certificate_without_one_valid_cn_is_closed_before_http(
    server: RunningServer,
    pki: TestPki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    subject, reason = ODD_SUBJECTS[case]
    caplog.set_level(logging.INFO, logger="chat.server")
    assert await _answer_to_a_request(server, _odd_client(pki, tmp_path, subject)) == b""
    refused = [r for r in caplog.records if r.getMessage().startswith("refused 127.0.0.1:")]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    line = refused[0].getMessage()
    assert reason in line
    assert line.isascii() and line.isprintable()  # no look-alike, no control character
    assert not any(r.exc_info for r in caplog.records)  # never a traceback


async def test_the_server_goes_on_serving_valid_identities(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    subject, _ = ODD_SUBJECTS["CR LF"]
    await _answer_to_a_request(server, _odd_client(pki, tmp_path, subject))
    answer = await _answer_to_a_request(server, pki.client_context("alice"))
    assert answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("name", ["", "a" * 65, "al ice", "bob\n", "\u0430lice", "x/y"])
def test_chat_certs_refuses_such_a_name(pki: TestPki, name: str) -> None:
    ca_key, ca_cert = pki_module.load_ca(pki_module.DevPki.at(pki.dir))
    with pytest.raises(pki_module.PkiError, match="client name must be 1-64"):
        pki_module.make_client_cert(ca_key, ca_cert, name)
