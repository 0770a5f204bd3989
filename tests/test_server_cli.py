"""`chat-server` as a user runs it: a real subprocess, dev certificates, signals, error lines."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from chat import pki as pki_module
from chat.cli_common import config_from
from chat.server.app import ChatServer
from chat.server.cli import build_parser, main
from chat.server.config import ServerConfig
from chat.store.keys import KeyStore
from chat.store.state import StateStore
from tests.conftest import RunningServer, StompPeer, TestPki, http_request, raw_ws

SERVER = [sys.executable, "-m", "chat.server.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=60, env=env)


async def start(tmp_path: Path, *args: str) -> tuple[trio.Process, int, str]:
    process = await trio.lowlevel.open_process(
        [
            *SERVER,
            "--port",
            "0",
            "--certs-dir",
            str(tmp_path / "certs"),
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ],
        stderr=subprocess.PIPE,
    )
    output = ""
    stderr = process.stderr
    assert stderr is not None
    with trio.fail_after(30):
        while not (match := re.search(r"ready on https://127\.0\.0\.1:(\d+)", output)):
            chunk = await stderr.receive_some(4096)
            assert chunk, output
            output += chunk.decode()
        while "chat-client" not in output:
            output += (await stderr.receive_some(4096)).decode()
    return process, int(match.group(1)), output


async def test_first_start_creates_dev_certs_and_prints_how_to_connect(tmp_path: Path) -> None:
    process, port, output = await start(tmp_path)
    try:
        assert "created development certificates" in output
        assert f"chat-client --cert {tmp_path / 'certs' / 'alice.crt'}" in output
        assert f"--url wss://127.0.0.1:{port}/ws" in output
        certs = pki_module.DevPki.at(tmp_path / "certs")
        running = RunningServer(ChatServer.__new__(ChatServer), port)
        context = pki_module.client_ssl_context(*certs.client("bob"), certs.ca)
        reply = await http_request(running, context, "GET", "/healthz")
        assert reply.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0


async def test_sigterm_closes_connections_with_1001_and_exits_0(tmp_path: Path) -> None:
    process, port, _ = await start(tmp_path)
    certs = pki_module.DevPki.at(tmp_path / "certs")
    pki = TestPki(certs.directory, certs.ca, certs.directory)
    running = RunningServer(ChatServer.__new__(ChatServer), port)
    async with raw_ws(running, pki, "alice") as ws:
        peer = StompPeer(ws)
        await peer.connect()
        process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            while True:
                await ws.get_message()
        assert info.value.reason is not None and info.value.reason.code == 1001
    with trio.fail_after(15):
        assert await process.wait() == 0


def test_help_lists_options() -> None:
    result = run("--help")
    assert result.returncode == 0
    for option in (
        "--port",
        "--certs-dir",
        "--state-dir",
        "--token-lifetime",
        "--heartbeat",
        "--passphrase-env",
        "--outbound-buffer-bytes",
    ):
        assert option in result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("option", "value", "line"),
    [
        ("--port", "99999", "--port must be 0 to 65535, not 99999"),
        ("--port", "-1", "--port must be 0 to 65535, not -1"),
        ("--token-lifetime", "0", "--token-lifetime must be at least 1, not 0"),
        ("--max-frame-bytes", "10", "--max-frame-bytes must be 1024 to 67108864, not 10"),
        ("--token-rate", "0", "--token-rate must be at least 0.001, not 0"),
        ("--max-connections", "0", "--max-connections must be 1 to 10000000, not 0"),
    ],
)
def test_a_value_that_cannot_work_is_one_line(
    option: str, value: str, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([option, value]) == 2  # in-process: the same path as the command's
    assert capsys.readouterr().err == f"chat-server: {line}\n"


@pytest.mark.parametrize(
    ("command", "store"),
    [
        ((), "the signing-key store"),
        (("revoke", "--sub", "mallory"), "the token state"),
        (("keys", "list"), "the signing-key store"),
    ],
)
def test_a_state_dir_that_is_a_file_is_one_line(
    tmp_path: Path, pki: TestPki, command: tuple[str, ...], store: str
) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    serving = () if command else ("--certs-dir", str(pki.dir), "--port", "0")
    result = run(*command, "--state-dir", str(not_a_dir), *serving)
    line = one_line_error(result)
    assert line.startswith(f"chat-server: cannot open {store} at {not_a_dir}/"), line
    assert line.endswith(f"{not_a_dir} is not a directory"), line


def test_missing_certificate_file(tmp_path: Path, pki: TestPki) -> None:
    line = one_line_error(
        run(
            "--port",
            "0",
            "--cert",
            str(tmp_path / "nope.crt"),
            "--key",
            str(pki.dir / "server.key"),
            "--ca",
            str(pki.ca),
            "--state-dir",
            str(tmp_path / "state"),
        )
    )
    assert line.startswith("chat-server: ") and "nope.crt" in line


def test_encrypted_key_without_passphrase(tmp_path: Path, pki: TestPki) -> None:
    ca_key, ca_cert = pki_module.load_ca(pki_module.DevPki.at(pki.dir))
    key, cert = pki_module.make_server_cert(ca_key, ca_cert, [])
    pki_module.write_private_key(tmp_path / "server.key", key, b"secret")
    pki_module.write_certificate(tmp_path / "server.crt", cert)
    args = (
        "--port",
        "0",
        "--cert",
        str(tmp_path / "server.crt"),
        "--key",
        str(tmp_path / "server.key"),
        "--ca",
        str(pki.ca),
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert "--passphrase-env" in one_line_error(run(*args))
    line = one_line_error(run(*args, "--passphrase-env", "CHAT_TEST_UNSET_VARIABLE"))
    assert "CHAT_TEST_UNSET_VARIABLE" in line


async def test_port_in_use(server: RunningServer, pki: TestPki, tmp_path: Path) -> None:
    result = await trio.to_thread.run_sync(
        lambda: run(
            "--port",
            str(server.port),
            "--certs-dir",
            str(pki.dir),
            "--state-dir",
            str(tmp_path / "state"),
        )
    )
    assert f"cannot listen on 127.0.0.1:{server.port}: " in one_line_error(result)


async def test_metrics_port_in_use(server: RunningServer, pki: TestPki, tmp_path: Path) -> None:
    taken = f"127.0.0.1:{server.port}"
    args = ("--port", "0", "--metrics", taken, "--certs-dir", str(pki.dir))
    result = await trio.to_thread.run_sync(
        lambda: run(*args, "--state-dir", str(tmp_path / "state"))
    )
    assert f"cannot listen on {taken} (--metrics): " in one_line_error(result)


def test_inconsistent_limits_are_refused(tmp_path: Path, pki: TestPki) -> None:
    line = one_line_error(
        run(
            "--port",
            "0",
            "--certs-dir",
            str(pki.dir),
            "--state-dir",
            str(tmp_path / "state"),
            "--max-frame-bytes",
            "65536",
            "--outbound-buffer-bytes",
            "1000",
        )
    )
    assert "outbound buffer (1000 bytes) must hold" in line


def server_state(directory: Path) -> str:
    """A state directory as a server's first start leaves it: the commands act on nothing else."""
    KeyStore.open(directory / "keys")
    StateStore.open(directory / "state.db").close()
    return str(directory)


def test_revoke_and_unrevoke(tmp_path: Path) -> None:
    state = server_state(tmp_path / "state")
    assert (
        "revoked identity 'alice'" in run("revoke", "--sub", "alice", "--state-dir", state).stdout
    )
    assert run("unrevoke", "--sub", "alice", "--state-dir", state).returncode == 0
    assert "not revoked" in one_line_error(run("unrevoke", "--sub", "alice", "--state-dir", state))


def test_keys_rotate_lists_both(tmp_path: Path) -> None:
    state = server_state(tmp_path / "state")
    first = run("keys", "list", "--state-dir", state)
    rotated = run("keys", "rotate", "--state-dir", state)
    assert first.returncode == rotated.returncode == 0
    assert len(rotated.stdout.strip().splitlines()) == 3  # message + old key + new active key


def test_config_defaults_match_protocol() -> None:
    config = ServerConfig()
    assert (config.host, config.port, config.heartbeat) == ("127.0.0.1", 8443, (10000, 10000))


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    commands = result.stdout.split("\ncommands:\n")[1].split("\n\n")[0]
    for command in ("serve", "revoke", "unrevoke", "keys", "admin"):
        assert f"\n    {command} " in commands
    assert "rotate" in commands and "list" in commands
    for usage in ("[serve] [OPTIONS]", "revoke (--sub NAME | --jti ID)", "keys {rotate,list}"):
        assert usage in result.stdout
    keys = run("keys", "--help")
    assert keys.returncode == 0 and "{rotate,list}" in keys.stdout


def test_help_shows_every_option_of_the_config_with_its_default() -> None:
    entries = re.split(r"\n  (?=--)", run("--help").stdout)  # one per option, flag first
    described = {
        entry.split()[0]: " ".join(entry.split("\n\n")[0].split()) for entry in entries[1:]
    }
    config = ServerConfig()
    defaults = {
        "--host": config.host,
        "--port": str(config.port),
        "--metrics": "off",
        "--proxy-listen": "off",
        "--trusted-proxy": "127.0.0.1/32,::1/128",
        "--certs-dir": "certs",
        "--cert": "CERTS_DIR/server.crt",
        "--key": "CERTS_DIR/server.key",
        "--ca": "CERTS_DIR/ca.crt",
        "--crl": "CERTS_DIR/crl.pem, if present",
        "--state-dir": "state",
        "--acl": "STATE_DIR/acl.toml, written with an allow-all policy on first start",
        "--token-lifetime": "300",
        "--refresh-lifetime": "1209600",
        "--clock-leeway": "30",
        "--heartbeat": "10000,10000",
        "--max-frame-bytes": "65536",
        "--max-subscriptions": "128",
        "--outbound-buffer-bytes": "4194304",
        "--max-connections": "10000",
        "--max-handshakes": "256",
        "--max-connections-per-identity": "32",
        "--max-subscriptions-per-identity": "1024",
        "--token-rate": "1",
        "--token-burst": "10",
        "--max-refresh-families": "16",
        "--publish-rate": "1000",
        "--publish-burst": "1000",
        "--history": "sqlite",
        "--retention-count": "1000",
        "--retention-age": "604800",
        "--retention-bytes": "16777216",
        "--history-memory-bytes": "67108864",
        "--max-topics": "100000",
        "--shutdown-grace": "5",
        "--log-level": "info",
        "--log-format": "text",
    }
    for flag, default in defaults.items():
        assert described[flag].endswith(f"(default {default})"), described[flag]
    no_default = {"--passphrase-env", "--trust-jwks", "--mtls"}
    assert set(described) == set(defaults) | no_default


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_serving_is_the_default_command_and_options_go_on_either_side() -> None:
    default = config_from(ServerConfig, parsed())
    assert default == ServerConfig()
    for argv in (
        ("--port", "9", "--heartbeat", "1,2"),
        ("serve", "--port", "9", "--heartbeat", "1,2"),
        ("--port", "9", "serve", "--heartbeat", "1,2"),
    ):
        args = parsed(*argv)
        assert args.run.__name__ == "_run_server"
        assert config_from(ServerConfig, args) == ServerConfig(port=9, heartbeat=(1, 2)), argv


def test_state_commands_take_state_dir_on_either_side() -> None:
    assert parsed("revoke", "--sub", "a").state_dir == ServerConfig().state_dir
    assert parsed("revoke", "--sub", "a", "--state-dir", "s").state_dir == Path("s")
    assert parsed("--state-dir", "s", "keys", "list").state_dir == Path("s")
    args = parsed("revoke", "--jti", "j", "--token-lifetime", "7")
    assert (args.jti, args.token_lifetime) == ("j", 7.0)
    assert parsed("revoke", "--jti", "j").token_lifetime == ServerConfig().token_lifetime


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (("--port", "x"), "argument --port: invalid int value: 'x' (see 'chat-server --help')"),
        (("--heartbeat", "1"), "argument --heartbeat: expected two integers in ms"),
        (("bogus",), "argument COMMAND: invalid choice: 'bogus'"),
        (("revoke",), "one of the arguments --sub --jti is required (see 'chat-server revoke"),
        (("keys", "spin"), "argument action: invalid choice: 'spin' (choose from"),
        (("--trust-jwks", "jwks.json"), "argument --trust-jwks: expected 2 arguments"),
    ],
)
def test_usage_errors_are_one_line(
    argv: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"chat-server: {said}"), err
