"""A real nginx in front (PROTOCOL.md §12, deploy/nginx.conf): nginx terminates TLS, the
server listens on --proxy-listen and verifies the forwarded certificate itself. The nginx
config is the deploy template with loopback ports and this test's files; `./dev test`
installs nginx-light where it can."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from chat.client.connection import connect
from chat.client.errors import TokenRefused
from chat.client.http import fetch_token, refresh_token
from tests.conftest import StartServer, TestPki, http_exchange

TEMPLATE = Path(__file__).parent.parent / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")

pytestmark = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (./dev test installs nginx-light when run as root with apt-get)",
)


@dataclass(frozen=True)
class Nginx:
    tls_port: int
    http_port: int

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.tls_port}/ws"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def site_config(certs: Path, tls_port: int, http_port: int, upstream: int) -> str:
    """deploy/nginx.conf on loopback ports, with this test's certificates and server."""
    site = TEMPLATE.read_text()
    for deployed, here in (
        ("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("/etc/chat-server/certs/", f"{certs}/"),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream};"),
    ):
        assert deployed in site, f"deploy/nginx.conf no longer has {deployed!r}"
        site = site.replace(deployed, here)
    return site


def main_config(directory: Path, site: str) -> str:
    """A whole nginx.conf of its own: no daemon, its own pid, logs and temporary files."""
    temp = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nworker_processes 1;\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log info;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n    access_log {directory}/access.log;\n{temp}\n{site}\n}}\n"
    )


@contextmanager
def running_nginx(directory: Path, certs: Path, upstream: int) -> Iterator[Nginx]:
    assert NGINX is not None
    directory.mkdir()
    nginx = Nginx(free_port(), free_port())
    conf = directory / "nginx.conf"
    conf.write_text(
        main_config(directory, site_config(certs, nginx.tls_port, nginx.http_port, upstream))
    )
    process = subprocess.Popen(
        [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield nginx
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
        assert process.returncode in (0, -15), errors.decode(errors="replace")


async def listening(port: int) -> None:
    """Wait (bounded) until nginx accepts on `port`."""
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


@pytest.fixture
async def behind_nginx(
    start_server: StartServer, pki: TestPki, tmp_path: Path
) -> AsyncIterator[Nginx]:
    server = await start_server(proxy_listen=("127.0.0.1", 0))
    upstream = server.server.proxy_listeners[0].socket.getsockname()[1]
    with running_nginx(tmp_path / "nginx", pki.dir, upstream) as nginx:
        await listening(nginx.tls_port)
        await listening(nginx.http_port)
        yield nginx
        await server.stop()


async def test_a_client_chats_through_nginx_and_renews_its_token(
    behind_nginx: Nginx, pki: TestPki
) -> None:
    alice, bob = pki.client_context("alice"), pki.client_context("bob")
    alice_grant = await fetch_token(behind_nginx.base_url, alice)
    bob_grant = await fetch_token(behind_nginx.base_url, bob)
    async with (
        connect(behind_nginx.ws_url, alice, alice_grant.access_token) as listener,
        connect(behind_nginx.ws_url, bob, bob_grant.access_token) as speaker,
    ):
        await listener.subscribe("/topic/lobby")
        await speaker.send("/topic/lobby", "hello through nginx")
        with trio.fail_after(5):
            message = await listener.receive()
        assert (message.sender, message.text) == ("bob", "hello through nginx")
        assert alice_grant.refresh_token is not None
        renewed = await refresh_token(behind_nginx.base_url, alice, alice_grant.refresh_token)
        await listener.renew(renewed.access_token)  # a RECEIPT: accepted in-band
        await speaker.send("/topic/lobby", "still here")
        with trio.fail_after(5):
            assert (await listener.receive()).text == "still here"


async def test_a_token_of_another_certificate_is_refused_through_nginx(
    behind_nginx: Nginx, pki: TestPki
) -> None:
    bob_token = (await fetch_token(behind_nginx.base_url, pki.client_context("bob"))).access_token
    with pytest.raises(TokenRefused) as refused:
        async with connect(behind_nginx.ws_url, pki.client_context("alice"), bob_token):
            pass
    assert refused.value.code == "token_cert_mismatch"


async def test_no_certificate_or_another_ca_is_refused_with_invalid_client_certificate(
    behind_nginx: Nginx, pki: TestPki
) -> None:
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    for context in (anonymous, pki.foreign_context()):
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", behind_nginx.tls_port, ssl_context=context, https_compatible=True
        )
        reply = await http_exchange(stream, "POST", "/auth/token")
        assert (reply.status, reply.json()["error"]) == (401, "invalid_client_certificate")


async def test_plain_ws_gets_a_clear_answer(behind_nginx: Nginx) -> None:
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(
            f"ws://127.0.0.1:{behind_nginx.http_port}/ws", subprotocols=["v12.stomp"]
        ):
            pass
    assert rejected.value.status_code == 426
    assert b"wss://" in (rejected.value.body or b"")
