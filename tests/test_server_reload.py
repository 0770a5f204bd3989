"""TLS files changed without a restart (PROTOCOL.md §12): over real TLS on loopback, the
server presents a rotated certificate, ends the live connections a new CRL revokes, reloads
on SIGHUP, and keeps its previous context when the new files make none."""

from __future__ import annotations

import logging
import signal
import ssl
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding
from trio_websocket import ConnectionClosed

from chat import pki
from chat.certs_cli import main as chat_certs
from chat.pki import DevPki
from chat.server.app import ChatServer
from tests.conftest import RunningServer, StartServer, TestPki, http_request, stomp_peer
from tests.test_server_cli import start as start_process

POLL = 0.05  # the server's file poll in these tests; the contract is 2 s at the default 1 s
WITHIN = 2.0  # PROTOCOL.md §12


@pytest.fixture
def certs(tmp_path: Path) -> DevPki:
    """A certs directory of the test's own: the session's shared one is never changed."""
    layout, _ = pki.ensure_dev_pki(tmp_path / "certs", ("alice", "bob"))
    return layout


def context(certs: DevPki, name: str) -> ssl.SSLContext:
    return pki.client_ssl_context(*certs.client(name), certs.ca)


def der(path: Path) -> bytes:
    return pki.load_certificate(path).public_bytes(Encoding.DER)


async def presented(server: RunningServer, client: ssl.SSLContext) -> bytes | None:
    """The certificate the server presents to `client`, or None when it refuses `client`
    (with TLS 1.3 the refusal arrives after the client's side of the handshake is done)."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=client)
    try:
        await stream.do_handshake()
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        if not await stream.receive_some(1024):
            return None
    except (trio.BrokenResourceError, ssl.SSLError):
        return None
    finally:
        await trio.aclose_forcefully(stream)
    return stream.getpeercert(binary_form=True)


async def until_presented(
    server: RunningServer, client: ssl.SSLContext, want: bytes | None
) -> None:
    with trio.fail_after(WITHIN):
        while await presented(server, client) != want:
            await trio.sleep(POLL)


async def test_a_rotated_server_certificate_is_presented_within_2_s(
    start_server: StartServer, certs: DevPki
) -> None:
    running = await start_server(certs_dir=certs.directory, revocation_poll=POLL)
    alice = context(certs, "alice")
    old = der(certs.server_cert)
    assert await presented(running, alice) == old
    assert chat_certs(["rotate-server", "--dir", str(certs.directory)]) == 0
    new = der(certs.server_cert)
    assert new != old
    await until_presented(running, alice, new)


async def test_a_crl_revoking_bob_ends_his_live_connection_and_not_alice_s(
    start_server: StartServer, certs: DevPki
) -> None:
    running = await start_server(certs_dir=certs.directory, revocation_poll=POLL)
    own = TestPki(certs.directory, certs.ca, certs.directory)
    async with stomp_peer(running, own, "alice") as alice, stomp_peer(running, own, "bob") as bob:
        pki.revoke(certs.directory, "bob")
        with trio.fail_after(WITHIN):
            error = await bob.receive(timeout=WITHIN)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await bob.ws.get_message()
        assert (error.command, error.get("message")) == ("ERROR", "certificate revoked")
        assert closed.value.reason is not None and closed.value.reason.code == 1008
        await alice.send("SUBSCRIBE", {"destination": "/topic/lobby", "id": "s", "receipt": "r"})
        assert (await alice.receive()).get("receipt-id") == "r"
    assert await presented(running, context(certs, "bob")) is None  # nor can it come back


async def test_sighup_reloads_at_once(tmp_path: Path) -> None:
    """Through the CLI: the files are re-read on SIGHUP even when their stamps say nothing
    changed (a restored backup with its old modification time, say)."""
    process, port, _ = await start_process(tmp_path)
    stderr = process.stderr
    assert stderr is not None
    try:
        # An answer means the event loop has run past the line that installs the handler.
        certs = DevPki.at(tmp_path / "certs")
        running = RunningServer(ChatServer.__new__(ChatServer), port)
        assert (await http_request(running, context(certs, "bob"), "GET", "/healthz")).status == 200
        process.send_signal(signal.SIGHUP)
        output = ""
        with trio.fail_after(WITHIN):
            while "TLS files reloaded (SIGHUP)" not in output:
                chunk = await stderr.receive_some(4096)
                assert chunk, output
                output += chunk.decode()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0


async def test_reload_tls_rereads_the_files_at_once(
    start_server: StartServer, certs: DevPki, caplog: pytest.LogCaptureFixture
) -> None:
    """What SIGHUP calls, in process, with a poll too slow to notice anything itself."""
    caplog.set_level(logging.INFO, logger="chat.server")
    running = await start_server(certs_dir=certs.directory, revocation_poll=3600)
    alice = context(certs, "alice")
    old = der(certs.server_cert)
    assert chat_certs(["rotate-server", "--dir", str(certs.directory)]) == 0
    assert await presented(running, alice) == old
    running.server.reload_tls()
    await until_presented(running, alice, der(certs.server_cert))
    assert "TLS files reloaded (SIGHUP)" in caplog.text


async def test_broken_files_keep_the_previous_context(
    start_server: StartServer, certs: DevPki, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(certs_dir=certs.directory, revocation_poll=POLL)
    alice = context(certs, "alice")
    old = der(certs.server_cert)
    other, _ = pki.ensure_dev_pki(certs.directory.parent / "other", ())
    certs.server_key.write_bytes(other.server_key.read_bytes())  # not server.crt's key
    with trio.fail_after(WITHIN):
        while "TLS files not reloaded, the previous ones stay in force" not in caplog.text:
            await trio.sleep(POLL)
    assert f"{certs.server_key} is not the private key of {certs.server_cert}" in caplog.text
    assert await presented(running, alice) == old
    caplog.clear()
    certs.ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n")
    with trio.fail_after(WITHIN):
        while "TLS files not reloaded" not in caplog.text:
            await trio.sleep(POLL)
    assert await presented(running, alice) == old
    assert caplog.text.count("TLS files not reloaded") == 1  # once per change, not per poll
