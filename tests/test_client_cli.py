"""`chat-client` as users run it: a real subprocess against the in-test server.

Scripted modes through pipes, the interactive UI through a pipe and through a pty rendered
by a terminal emulator (pyte), where the full screen is live and incoming lines must not
garble the line being typed.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path

import pyte
import pytest
import trio

from chat import pki as pki_module
from chat.cli_common import UsageError
from chat.client.auth import open_chat
from chat.client.cli import parse_options, send_destination
from chat.client.connection import StompClient
from tests.conftest import RunningServer, TestPki
from tests.test_client_library import chat_as
from tests.test_client_resilience import Servers, restartable

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "chat.client.cli"]
FAST = 10  # seconds: a subprocess starts, fetches a token and connects in well under one


def cli_args(server: RunningServer, pki: TestPki, name: str, *extra: str) -> list[str]:
    return [*CLI, "--cert", str(pki.client(name)[0]), "--url", server.ws_url, *extra]


async def run_cli(
    args: list[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(FAST):
        return await trio.run_process(
            args,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
            env=env,
        )


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single stderr line of a failed run (exit 2, no traceback)."""
    assert result.returncode == 2, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chat-client: "), lines
    return lines[0]


async def read_until(stream: trio.abc.ReceiveStream, buffer: bytearray, text: str) -> str:
    """Read `stream` into `buffer` until `text` shows up; return everything read so far."""
    with trio.fail_after(FAST):
        while text.encode() not in buffer:
            chunk = await stream.receive_some()
            assert chunk, f"stream ended before {text!r}: {bytes(buffer)!r}"
            buffer += chunk
    return buffer.decode(errors="replace")


def bob_chat(server: RunningServer, pki: TestPki) -> AbstractAsyncContextManager[StompClient]:
    cert, key = pki.client("bob")
    return open_chat(server.ws_url, cert, key, pki.ca)


def background(args: list[str]) -> Callable[..., Awaitable[object]]:
    """A `nursery.start` target: the process runs with piped stdout/stderr."""
    return partial(
        trio.run_process,
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
        cwd=ROOT,
    )


# ---------------------------------------------------------------- scripted use


async def test_send_and_listen_json(server: RunningServer, pki: TestPki) -> None:
    listen = cli_args(server, pki, "bob", "--listen", "dev.#", "--json", "--count", "1")
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(background(listen))
        await read_until(listener.stderr, bytearray(), "* listening on dev.#")
        sent = await run_cli(cli_args(server, pki, "alice", "--send", "dev.backend", "hi, bob"))
        assert sent.returncode == 0, sent
        output = bytearray()
        await read_until(listener.stdout, output, "\n")
        with trio.fail_after(FAST):
            assert await listener.wait() == 0
    record = json.loads(output.decode())
    assert record["room"] == "dev.backend" and record["destination"] == "/topic/dev.backend"
    assert (record["sender"], record["body"]) == ("alice", "hi, bob")
    assert isinstance(record["timestamp"], int) and record["message_id"]


async def test_ctrl_c_leaves_a_listener_cleanly(server: RunningServer, pki: TestPki) -> None:
    async with trio.open_nursery() as nursery:
        args = cli_args(server, pki, "bob", "--listen", "lobby")
        listener = await nursery.start(background(args))
        await read_until(listener.stderr, bytearray(), "* listening on lobby")
        listener.send_signal(signal.SIGINT)
        with trio.fail_after(FAST):
            assert await listener.wait() == 0


async def test_encrypted_key_needs_its_passphrase(
    server: RunningServer, pki: TestPki, tmp_path: Path
) -> None:
    cert, key = pki.client("carol")
    locked = tmp_path / "carol.key"
    pki_module.write_private_key(locked, pki_module.load_private_key(key), b"s3cret")
    (tmp_path / "carol.crt").write_bytes(cert.read_bytes())
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    args = [
        *CLI,
        "--cert",
        str(tmp_path / "carol.crt"),
        "--url",
        server.ws_url,
        "--send",
        "lobby",
        "x",
    ]
    line = one_error_line(await run_cli(args))
    assert str(locked) in line and "--passphrase-env" in line
    env = {**os.environ, "CAROL_PASS": "s3cret"}
    unlocked = await run_cli([*args, "--passphrase-env", "CAROL_PASS"], env=env)
    assert unlocked.returncode == 0, unlocked


# ---------------------------------------------------------------- one-line errors


async def test_missing_certificate_file(pki: TestPki, tmp_path: Path) -> None:
    missing = tmp_path / "dave.crt"
    line = one_error_line(await run_cli([*CLI, "--cert", str(missing), "--send", "lobby", "x"]))
    assert str(missing) in line and "chat-certs client dave" in line


async def test_missing_ca_file(pki: TestPki, tmp_path: Path) -> None:
    cert, _ = pki.client("alice")
    missing = tmp_path / "nope.crt"
    line = one_error_line(await run_cli([*CLI, "--cert", str(cert), "--ca", str(missing)]))
    assert str(missing) in line and "--ca" in line


async def test_unreachable_server(pki: TestPki) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [
        *CLI,
        "--cert",
        str(pki.client("alice")[0]),
        "--url",
        f"wss://127.0.0.1:{port}/ws",
        "--send",
        "lobby",
        "x",
    ]
    line = one_error_line(await run_cli(args))
    assert f"cannot reach 127.0.0.1:{port}: connection refused (tried 4 times)" in line


async def test_server_from_another_ca(server: RunningServer, pki: TestPki) -> None:
    foreign_ca = pki.foreign_dir / "ca.crt"
    args = cli_args(server, pki, "alice", "--ca", str(foreign_ca), "--send", "lobby", "x")
    line = one_error_line(await run_cli(args))
    assert "server's certificate is not signed by our CA" in line and str(foreign_ca) in line


async def test_client_certificate_from_another_ca(server: RunningServer, pki: TestPki) -> None:
    mallory = pki.foreign_dir / "mallory.crt"
    args = [
        *CLI,
        "--cert",
        str(mallory),
        "--ca",
        str(pki.ca),
        "--url",
        server.ws_url,
        "--send",
        "lobby",
        "x",
    ]
    line = one_error_line(await run_cli(args))
    assert "rejected our client certificate" in line


async def test_usage_errors_are_one_line(pki: TestPki) -> None:
    cert = str(pki.client("alice")[0])
    assert "--cert" in one_error_line(await run_cli([*CLI, "--send", "lobby", "x"]))
    assert "--listen" in one_error_line(await run_cli([*CLI, "--cert", cert, "--json"]))
    wildcard = one_error_line(await run_cli([*CLI, "--cert", cert, "--send", "dev.*", "x"]))
    assert "wildcards" in wildcard


def test_at_name_is_an_inbox(pki: TestPki) -> None:
    cert = str(pki.client("alice")[0])
    options = parse_options(["--cert", cert, "--send", "@bob", "hi"])
    assert options.send == ("@bob", "hi") and send_destination("@bob") == "/user/bob"
    assert parse_options(["--cert", cert, "--listen", "@"]).listen == "@"
    assert parse_options(["--cert", cert, "--listen", "@alice"]).listen == "@alice"
    for wrong in (["--send", "@", "hi"], ["--send", "@b!b", "hi"], ["--listen", "@b b"]):
        with pytest.raises(UsageError, match="@NAME needs a name"):
            parse_options(["--cert", cert, *wrong])
    with pytest.raises(UsageError, match=r"\(@ alone: your whole inbox\)"):
        parse_options(["--cert", cert, "--listen", "@*"])


async def test_help_lists_every_option_and_default() -> None:
    script = Path(sys.executable).with_name("chat-client")  # the installed console script
    result = await run_cli([str(script), "--help"] if script.exists() else [*CLI, "--help"])
    assert result.returncode == 0
    text = result.stdout.decode()
    for option in (
        "--cert",
        "--key",
        "--ca",
        "--passphrase-env",
        "--url",
        "--room",
        "--heartbeat",
        "--send",
        "--listen",
        "--json",
        "--count",
    ):
        assert option in text
    for default in ("wss://127.0.0.1:8443/ws", "lobby", "10000", "ca.crt"):
        assert default in text
    for command in ("/dm NAME", "/msg NAME TEXT", "/who", "/rooms", "--send @bob", "--listen @"):
        assert command in text


# ---------------------------------------------------------------- interactive


async def test_interactive_through_a_pipe(server: RunningServer, pki: TestPki) -> None:
    """Plain lines, no escape codes; typed text is sent in the background, so its echo is
    awaited before the commands (whose answers come at once)."""
    out = bytearray()
    async with bob_chat(server, pki) as bob, trio.open_nursery() as nursery:
        await bob.subscribe("/topic/lobby")
        alice = await nursery.start(
            partial(
                trio.run_process,
                cli_args(server, pki, "alice"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                cwd=ROOT,
            )
        )
        await alice.stdin.send_all(b"hello from a pipe\n")
        with trio.fail_after(FAST):
            got = await bob.receive()
        await read_until(alice.stdout, out, "[lobby] alice: hello from a pipe\n")
        await alice.stdin.send_all(b"/join dev.backend\n/rooms\n/frob\n/leave\n/rooms\n/quit\n")
        with trio.fail_after(FAST):
            assert await alice.wait() == 0
            while chunk := await alice.stdout.receive_some():
                out += chunk
    assert (got.sender, got.text) == ("alice", "hello from a pipe")
    assert b"\x1b" not in out
    lines = out.decode().splitlines()
    assert "* joined lobby" in lines and "* joined dev.backend" in lines
    assert "* rooms: lobby, dev.backend (current)" in lines
    assert any(line.startswith("* unknown command /frob") for line in lines)
    assert "* left dev.backend; now talking in lobby" in lines
    assert "* rooms: lobby (current)" in lines
    assert any(line.endswith("[lobby] alice: hello from a pipe") for line in lines)


async def test_end_of_input_waits_for_the_lines_typed_before(
    server: RunningServer, pki: TestPki
) -> None:
    """A script piping lines in and closing its end: every line is sent before leaving."""
    async with bob_chat(server, pki) as bob:
        await bob.subscribe("/topic/lobby")
        typed = b"".join(f"line {i}\n".encode() for i in range(5))
        result = await run_cli(cli_args(server, pki, "alice"), stdin=typed)
        with trio.fail_after(FAST):
            got = [(await bob.receive()).text for _ in range(5)]
    assert result.returncode == 0, result
    assert got == [f"line {i}" for i in range(5)]


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is stdin, so Ctrl-C is SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyScreen:
    """The far side of a pty, rendered by pyte: what the user of a real terminal sees."""

    def __init__(self, master: trio.lowlevel.FdStream, columns: int, rows: int) -> None:
        self._master = master
        self.screen = pyte.Screen(columns, rows)
        self._stream = pyte.ByteStream(self.screen)
        self.written = bytearray()

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    async def until(self, check: Callable[[list[str]], bool]) -> list[str]:
        with trio.move_on_after(FAST):
            while not check(self.lines()):
                chunk = await self._master.receive_some()
                assert chunk, "the client closed the terminal"
                self.written += chunk
                self._stream.feed(chunk)
            return self.lines()
        raise AssertionError("the screen never got there:\n" + "\n".join(self.lines()))

    async def has_line(self, text: str) -> list[str]:
        return await self.until(lambda lines: text in lines)

    async def wait(self, process: trio.Process) -> int:
        """The process's exit status, reading the screen meanwhile (so it never blocks)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.until, lambda lines: False)
            with trio.fail_after(FAST):
                status = await process.wait()
            nursery.cancel_scope.cancel()
        return status


@pytest.mark.parametrize(
    "leave", [b"\x15\x04", b"\x03", b"\x15/quit\r"], ids=["ctrl-d", "ctrl-c", "quit"]
)
async def test_interactive_on_a_terminal(
    server: RunningServer, pki: TestPki, tmp_path: Path, leave: bytes
) -> None:
    """Through a pty: the full screen is up, an incoming line keeps the user's typing intact,
    and leaving gives the terminal back as it was."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 12, 70, 0, 0))
    before = termios.tcgetattr(slave)
    args = cli_args(server, pki, "alice", "--token-file", str(tmp_path / "alice.refresh"))
    async with bob_chat(server, pki) as bob, trio.lowlevel.FdStream(master) as terminal:
        await bob.subscribe("/topic/lobby")
        process = await trio.lowlevel.open_process(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env={**os.environ, "TERM": "xterm"},
            preexec_fn=_own_terminal,
        )
        screen = PtyScreen(terminal, 70, 12)
        await screen.has_line("[lobby] >")
        await screen.until(lambda lines: lines[-1] == "connected as alice")
        await terminal.send_all(b"typed on a tty\r")
        with trio.fail_after(FAST):
            got = await bob.receive()
        assert (got.sender, got.text) == ("alice", "typed on a tty")
        await screen.until(lambda lines: lines[2].endswith("[lobby] alice: typed on a tty"))
        await terminal.send_all(b"half")
        await screen.has_line("[lobby] > half")
        await bob.send("/topic/lobby", "incoming while typing")
        lines = await screen.until(lambda lines: lines[3].endswith("bob: incoming while typing"))
        assert lines[-2:] == ["[lobby] > half", "connected as alice"]  # typing intact
        await terminal.send_all(leave)
        assert await screen.wait(process) == 0  # (Ctrl-U empties the line first)
        assert termios.tcgetattr(slave) == before
    os.close(slave)
    assert screen.written.rindex(b"\x1b[?1049l") > screen.written.rindex(b"\x1b[?1049h")


# ---------------------------------------------------------------- reconnecting


@pytest.fixture
def servers(nursery: trio.Nursery, pki: TestPki, tmp_path: Path) -> Servers:
    return restartable(nursery, pki, tmp_path)


async def test_listen_json_survives_a_restart(
    servers: Servers, pki: TestPki, tmp_path: Path
) -> None:
    """The server restarts under --listen --json; what was published meanwhile (through
    another server on the same state) comes after it, in order, once."""
    first = await servers.start()
    token_file = str(tmp_path / "bob.refresh")
    args = cli_args(
        first, pki, "bob", "--listen", "lobby", "--json", "--count", "4", "--token-file", token_file
    )
    out, err = bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(background(args))
        await read_until(listener.stderr, err, "* listening on lobby")
        async with chat_as(first, pki, "alice") as alice:
            await alice.send("/topic/lobby", "m1")
        await read_until(listener.stdout, out, "m1")
        await servers.stop()
        await read_until(listener.stderr, err, "* reconnecting")
        aside = await servers.start(elsewhere=True)
        async with chat_as(aside, pki, "alice") as alice:
            await alice.send("/topic/lobby", "m2")
            await alice.send("/topic/lobby", "m3")
        await servers.stop()
        second = await servers.start()
        status = await read_until(listener.stderr, err, "* back online")
        async with chat_as(second, pki, "alice") as alice:
            await alice.send("/topic/lobby", "m4")
        with trio.fail_after(FAST):
            assert await listener.wait() == 0
            while chunk := await listener.stdout.receive_some():
                out += chunk
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["body"] for r in records] == ["m1", "m2", "m3", "m4"]
    assert "* reconnecting\N{HORIZONTAL ELLIPSIS} (attempt 1, next try in " in status
    assert "may be missing" not in status


async def test_interactive_session_survives_a_restart(
    servers: Servers, pki: TestPki, tmp_path: Path
) -> None:
    first = await servers.start()
    args = cli_args(first, pki, "alice", "--token-file", str(tmp_path / "alice.refresh"))
    screen = bytearray()
    async with trio.open_nursery() as nursery:
        alice = await nursery.start(
            partial(
                trio.run_process,
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                cwd=ROOT,
            )
        )
        await read_until(alice.stdout, screen, "* joined lobby")
        await servers.stop()
        await read_until(alice.stdout, screen, "* reconnecting")
        second = await servers.start()
        await read_until(alice.stdout, screen, "* back online")
        async with bob_chat(second, pki) as bob:
            await bob.subscribe("/topic/lobby")
            await alice.stdin.send_all(b"typed after the restart\n")
            with trio.fail_after(FAST):
                got = await bob.receive()
        assert (got.sender, got.text) == ("alice", "typed after the restart")
        await alice.stdin.send_all(b"/quit\n")
        with trio.fail_after(FAST):
            assert await alice.wait() == 0
