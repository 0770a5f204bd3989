"""Behind a TLS-terminating proxy (PROTOCOL.md §12): the forwarded certificate is verified by
the server itself; only trusted proxies may connect; the TLS listener ignores the header."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from trio_websocket import open_websocket_url

from chat import pki as pki_module
from chat.protocol.errors import HttpRefusal
from chat.server.config import ServerConfig, parse_networks
from chat.server.http_api import Request
from chat.server.proxy import CLIENT_CERT_HEADER, ProxyGate, forwarded_certificate
from chat.server.tls import TlsContexts
from tests.conftest import (
    HttpReply,
    RunningServer,
    StartServer,
    StompPeer,
    TestPki,
    http_exchange,
    http_request,
)

LOOPBACK = parse_networks("127.0.0.0/8")
NOW = datetime.now(UTC)


def escaped(cert_path: Path) -> str:
    """The header value nginx's `$ssl_client_escaped_cert` sends: URL-encoded PEM."""
    return quote(cert_path.read_text(), safe="")


def pem_of(cert: x509.Certificate) -> str:
    return quote(cert.public_bytes(Encoding.PEM).decode(), safe="")


def signed_leaf(pki: TestPki, names: list[str], start: datetime, end: datetime) -> x509.Certificate:
    """A clientAuth certificate of our CA with `names` as its CNs and the given validity."""
    ca_key, ca_cert = pki_module.load_ca(pki_module.DevPki.at(pki.dir))
    key = pki_module.generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in names])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


@pytest.fixture
def gate(pki: TestPki, tmp_path: Path) -> ProxyGate:
    """A gate over a copy of the test PKI in which carol is revoked."""
    certs = tmp_path / "certs"
    shutil.copytree(pki.dir, certs)
    pki_module.revoke(certs, "carol")
    return ProxyGate(LOOPBACK, TlsContexts(ServerConfig(certs_dir=certs)), lambda: NOW.timestamp())


def request_with(value: str | None) -> Request:
    headers = () if value is None else ((CLIENT_CERT_HEADER, value),)
    return Request("POST", "/auth/token", headers, b"")


def refusal_of(gate: ProxyGate, value: str | None, address: str = "127.0.0.1:4000") -> HttpRefusal:
    with pytest.raises(HttpRefusal) as caught:
        gate.identify(address, request_with(value))
    return caught.value


def test_a_forwarded_certificate_of_our_ca_is_its_identity(gate: ProxyGate, pki: TestPki) -> None:
    cert_path, _ = pki.client("alice")
    peer = gate.identify("127.0.0.1:4000", request_with(escaped(cert_path)))
    der = pki_module.load_certificate(cert_path).public_bytes(Encoding.DER)
    assert (peer.identity, peer.x5t, peer.address) == (
        "alice",
        pki_module.thumbprint(der),
        "127.0.0.1:4000",
    )
    assert peer.serial == pki_module.serial_of(der)


@pytest.mark.parametrize("address", ["10.1.2.3:4000", "::1:4000", "a peer"])
def test_a_source_outside_the_trusted_proxies_is_refused(
    gate: ProxyGate, pki: TestPki, address: str
) -> None:
    refusal = refusal_of(gate, escaped(pki.client("alice")[0]), address)
    assert (refusal.status, refusal.code) == (403, "untrusted_proxy")


def test_refused_certificates(gate: ProxyGate, pki: TestPki) -> None:
    expired = signed_leaf(pki, ["dave"], NOW - timedelta(days=10), NOW - timedelta(days=1))
    future = signed_leaf(pki, ["dave"], NOW + timedelta(days=1), NOW + timedelta(days=10))
    two_cns = signed_leaf(pki, ["dave", "eve"], NOW - timedelta(days=1), NOW + timedelta(days=1))
    cases = {
        "missing": None,
        "empty": "",
        "garbage": "not%20a%20certificate",
        "other CA": escaped(pki.foreign_dir / "mallory.crt"),
        "expired": pem_of(expired),
        "not yet valid": pem_of(future),
        "revoked": escaped(pki.client("carol")[0]),
        "two CNs": pem_of(two_cns),
        "server certificate": escaped(pki.dir / "server.crt"),  # not for clientAuth
    }
    for case, value in cases.items():
        refusal = refusal_of(gate, value)
        assert (refusal.status, refusal.code) == (401, "invalid_client_certificate"), case
    assert "revoked" in refusal_of(gate, cases["revoked"]).detail
    assert "2 CNs" in refusal_of(gate, cases["two CNs"]).detail


def test_the_header_value_is_url_encoded_pem(pki: TestPki) -> None:
    cert_path, _ = pki.client("bob")
    assert forwarded_certificate(escaped(cert_path)) == pki_module.load_certificate(cert_path)


# ---------------------------------------------------------------- a real server


async def start_proxied(
    start_server: StartServer, **overrides: object
) -> tuple[RunningServer, int]:
    server = await start_server(proxy_listen=("127.0.0.1", 0), **overrides)
    return server, server.server.proxy_listeners[0].socket.getsockname()[1]


async def proxied(
    port: int, method: str, path: str, cert: str | None, body: bytes = b""
) -> HttpReply:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    headers = [] if cert is None else [("X-SSL-Client-Cert", cert)]
    return await http_exchange(stream, method, path, headers, body)


async def test_the_proxy_listener_issues_tokens_bound_to_the_forwarded_certificate(
    start_server: StartServer, pki: TestPki
) -> None:
    server, port = await start_proxied(start_server)
    cert_path, _ = pki.client("alice")
    reply = await proxied(port, "POST", "/auth/token", escaped(cert_path))
    assert reply.status == 200, reply
    claims = jwt.decode(reply.json()["access_token"], options={"verify_signature": False})
    der = pki_module.load_certificate(cert_path).public_bytes(Encoding.DER)
    assert claims["sub"] == "alice" and claims["cnf"]["x5t#S256"] == pki_module.thumbprint(der)
    # the same token opens a STOMP session through the proxy listener
    token = reply.json()["access_token"]
    async with open_websocket_url(
        f"ws://127.0.0.1:{port}/ws",
        subprotocols=["v12.stomp", f"bearer.{token}"],
        extra_headers=[("X-SSL-Client-Cert", escaped(cert_path))],
    ) as ws:
        await StompPeer(ws).connect()
    # another certificate than the token's: the binding holds here too
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    headers = [
        ("X-SSL-Client-Cert", escaped(pki.client("bob")[0])),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", f"v12.stomp, bearer.{token}"),
    ]
    refused = await http_exchange(stream, "GET", "/ws", headers)
    assert (refused.status, refused.json()["error"]) == (403, "token_cert_mismatch")
    await server.stop()


async def test_the_proxy_listener_refuses_a_missing_or_foreign_certificate(
    start_server: StartServer, pki: TestPki
) -> None:
    server, port = await start_proxied(start_server)
    for cert in (None, escaped(pki.foreign_dir / "mallory.crt")):
        reply = await proxied(port, "POST", "/auth/token", cert)
        assert (reply.status, reply.json()["error"]) == (401, "invalid_client_certificate")
    await server.stop()


async def test_an_untrusted_source_gets_403_untrusted_proxy(
    start_server: StartServer, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    server, port = await start_proxied(start_server, trusted_proxy=parse_networks("10.0.0.0/8"))
    with caplog.at_level(logging.INFO, logger="chat.server"):
        reply = await proxied(port, "GET", "/healthz", escaped(pki.client("alice")[0]))
    assert (reply.status, reply.json()["error"]) == (403, "untrusted_proxy")
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "handshake_refused"]
    assert line.peer.startswith("127.0.0.1:") and "untrusted_proxy" in line.reason  # type: ignore[attr-defined]
    await server.stop()


async def test_the_tls_listener_ignores_a_forwarded_certificate(
    start_server: StartServer, pki: TestPki
) -> None:
    server, _ = await start_proxied(start_server)
    bob = [("X-SSL-Client-Cert", escaped(pki.client("bob")[0]))]
    reply = await http_request(server, pki.client_context("alice"), "POST", "/auth/token", bob)
    assert reply.status == 200, reply
    claims = jwt.decode(reply.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "alice"
    await server.stop()


def test_trusted_proxy_needs_cidrs() -> None:
    assert parse_networks("127.0.0.1/32, ::1/128")[1].version == 6
    with pytest.raises(ValueError, match="expected CIDR"):
        parse_networks("10.0.0.0/33")


def test_a_crl_reload_applies_to_forwarded_certificates(pki: TestPki, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(pki.dir, certs)
    tls = TlsContexts(ServerConfig(certs_dir=certs))
    gate = ProxyGate(LOOPBACK, tls, lambda: NOW.timestamp())
    alice = request_with(escaped(certs / "alice.crt"))
    assert gate.identify("127.0.0.1:4000", alice).identity == "alice"
    pki_module.revoke(certs, "alice")
    tls.reload()
    with pytest.raises(HttpRefusal, match="revoked"):
        gate.identify("127.0.0.1:4000", alice)
