"""Errors a user meets, each named for what it is: a wrong URL path, a certificate from
another CA, a revoked one, an expired one (PROTOCOL.md §1, §2). Through the library and
through `chat-client` as a subprocess (one line, exit code 2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from chat import pki as pki_module
from chat.client.connection import connect
from chat.client.errors import BadResponse
from chat.client.http import fetch_token
from chat.pki import CertificateNotCurrent, check_current, rejection_cause
from tests.conftest import RunningServer, StartServer, TestPki
from tests.test_client_cli import CLI, one_error_line, run_cli

FAST = 5


def _cli(server: RunningServer, cert: Path, ca: Path, *extra: str) -> list[str]:
    return [*CLI, "--cert", str(cert), "--ca", str(ca), "--url", server.ws_url, *extra]


async def test_url_without_the_ws_path_is_named_as_such(
    server: RunningServer, pki: TestPki
) -> None:
    """The server answers 404 for `/`: that is a wrong path, not a refused token."""
    context = pki.client_context("alice")
    grant = await fetch_token(server.base_url, context)
    bare = f"wss://127.0.0.1:{server.port}"
    with trio.fail_after(FAST), pytest.raises(BadResponse) as refused:
        async with connect(bare, context, grant.access_token):
            pass
    said = str(refused.value)
    assert "not the chat's WebSocket endpoint" in said and f"{bare}/ws" in said
    assert "token" not in said

    args = [*CLI, "--cert", str(pki.client("alice")[0]), "--url", bare, "--send", "lobby", "x"]
    line = one_error_line(await run_cli(args))
    assert "not the chat's WebSocket endpoint" in line and f"{bare}/ws" in line


async def test_certificate_from_another_ca_is_named(server: RunningServer, pki: TestPki) -> None:
    mallory = pki.foreign_dir / "mallory.crt"
    line = one_error_line(await run_cli(_cli(server, mallory, pki.ca, "--send", "lobby", "x")))
    assert "rejected our client certificate" in line
    assert f"{mallory} was not issued by the CA" in line


@pytest.fixture
def own_pki(tmp_path: Path) -> pki_module.DevPki:
    """A certs directory of this test's own, so revoking in it disturbs no other test."""
    dev, _ = pki_module.ensure_dev_pki(tmp_path / "certs", ("dave", "erin"))
    return dev


async def test_revoked_certificate_is_named(
    start_server: StartServer, own_pki: pki_module.DevPki
) -> None:
    pki_module.revoke(own_pki.directory, "dave")
    server = await start_server(certs_dir=own_pki.directory)
    dave = own_pki.client("dave")[0]
    line = one_error_line(await run_cli(_cli(server, dave, own_pki.ca, "--send", "lobby", "x")))
    assert f"{dave} is revoked: {own_pki.crl} lists it since" in line
    assert rejection_cause(own_pki.client("erin")[0], own_pki.ca) is None  # not revoked


def _expired_copy(dev: pki_module.DevPki, name: str, directory: Path) -> Path:
    """`name`'s key with a certificate that ended yesterday, from the same CA."""
    ca_key, ca_cert = pki_module.load_ca(dev)
    key = pki_module.load_private_key(dev.client(name)[1])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir()
    crt = directory / f"{name}.crt"
    pki_module.write_certificate(crt, cert)
    (directory / f"{name}.key").write_bytes(dev.client(name)[1].read_bytes())
    return crt


async def test_expired_certificate_is_named_before_connecting(
    server: RunningServer, own_pki: pki_module.DevPki, tmp_path: Path
) -> None:
    crt = _expired_copy(own_pki, "dave", tmp_path / "old")
    line = one_error_line(await run_cli(_cli(server, crt, own_pki.ca, "--send", "lobby", "x")))
    assert f"{crt} expired on" in line and "chat-certs client dave --force" in line


def test_validity_is_checked_at_both_ends(own_pki: pki_module.DevPki) -> None:
    crt = own_pki.client("dave")[0]
    cert = pki_module.load_certificate(crt)
    check_current(cert, crt, datetime.now(UTC))
    with pytest.raises(CertificateNotCurrent, match="expired on"):
        check_current(cert, crt, cert.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(CertificateNotCurrent, match="not valid before .* clock"):
        check_current(cert, crt, cert.not_valid_before_utc - timedelta(seconds=1))
