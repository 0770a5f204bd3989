"""`chat-client`: the terminal chat client, interactive or scriptable (--send, --listen).

Every error is one line on stderr starting with "chat-client: " and exit status 2, never
a traceback. Ctrl-C, Ctrl-D and /quit leave cleanly (DISCONNECT, wait for its RECEIPT).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn

import trio

from chat.client.connection import ClientError, Message, StompClient, open_chat
from chat.client.http import TlsFailure
from chat.client.terminal import (
    ChatSession,
    Console,
    first_of,
    format_message,
    room_destination,
    room_of,
)
from chat.errors import InvalidDestination
from chat.pki import PkiError

PROG = "chat-client"
EXIT_OK = 0
EXIT_ERROR = 2  # every failure, as argparse uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a --send cut short may not have been delivered
DEFAULT_URL = "wss://127.0.0.1:8443/ws"  # chat-server's default listener
DEFAULT_ROOM = "lobby"
DEFAULT_HEARTBEAT_MS = 10_000  # the server's own offer (PROTOCOL.md §5)

DESCRIPTION = """\
Chat over STOMP 1.2 / WebSocket / mutual TLS. Your certificate is your identity: the
client fetches an access token with it (POST /auth/token), connects, and joins a room.

Interactive (the default): typed lines go to the current room; /join ROOM, /leave [ROOM],
/rooms, /help, /quit. Incoming messages show time, room and sender; lines starting
with * are status lines. Ctrl-D or Ctrl-C leave.

Rooms are topic names: lobby, dev.backend, ... ; /join (and --listen) also take the
wildcards * (one segment: dev.*) and # (any number of segments: dev.#), to listen.

Scriptable:
  chat-client --cert certs/alice.crt --send lobby "hello"
  chat-client --cert certs/bob.crt --listen lobby --json --count 1

Exit status: 0 on success and on leaving with Ctrl-C, Ctrl-D or /quit; 2 on any error,
including a lost connection, with one line on stderr; 130 when Ctrl-C cuts a --send short.
"""


class UsageError(Exception):
    """A bad command line: reported on one line like every other error."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + message) and never exits."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    cert: Path
    key: Path
    ca: Path
    passphrase: bytes | None = field(repr=False)
    heartbeat_ms: int
    room: str
    send: tuple[str, str] | None  # (room, text)
    listen: str | None
    json: bool
    count: int | None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client; returns the exit status (see the module docstring)."""
    try:
        options = parse_options(argv)
        return trio.run(_run, options)
    except (ClientError, PkiError, UsageError, InvalidDestination) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the signal handlers are in place
        return EXIT_INTERRUPTED


def parse_options(argv: Sequence[str] | None) -> Options:
    args = _build_parser().parse_args(argv)
    if (args.json or args.count is not None) and args.listen is None:
        raise UsageError(f"--json and --count go with --listen (see '{PROG} --help')")
    cert: Path = args.cert
    key: Path = args.key or cert.with_suffix(".key")
    ca: Path = args.ca or cert.parent / "ca.crt"
    _check_files(cert, key, ca)
    if args.send is not None:
        room_destination(args.send[0], wildcards=False)
    room_destination(args.listen or args.room, wildcards=True)
    return Options(
        url=args.url,
        cert=cert,
        key=key,
        ca=ca,
        passphrase=_passphrase(args.passphrase_env),
        heartbeat_ms=args.heartbeat,
        room=args.room,
        send=tuple(args.send) if args.send is not None else None,
        listen=args.listen,
        json=args.json,
        count=args.count,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cert", type=Path, required=True, metavar="FILE",
        help="your client certificate (its CN is your name), e.g. certs/alice.crt",
    )
    parser.add_argument(
        "--key", type=Path, metavar="FILE",
        help="its private key (default: the certificate's name with .key, beside it)",
    )
    parser.add_argument(
        "--ca", type=Path, metavar="FILE",
        help="the CA certificate that signed the server's (default: ca.crt beside --cert)",
    )
    parser.add_argument(
        "--passphrase-env", metavar="VAR",
        help="the key is encrypted: its passphrase is in environment variable VAR",
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, metavar="URL",
        help="the server's STOMP endpoint; tokens come from https:// on the same host and "
        f"port (default: {DEFAULT_URL})",
    )
    parser.add_argument(
        "--room", default=DEFAULT_ROOM,
        help=f"the room to join at start, interactive mode (default: {DEFAULT_ROOM})",
    )
    parser.add_argument(
        "--heartbeat", type=_non_negative, default=DEFAULT_HEARTBEAT_MS, metavar="MS",
        help="STOMP heart-beat interval offered both ways, in ms; a server silent for twice "
        f"the agreed interval is reported lost; 0 turns them off (default: {DEFAULT_HEARTBEAT_MS})",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--send", nargs=2, metavar=("ROOM", "TEXT"),
        help="send TEXT to ROOM, wait until the server has stored it, and exit",
    )
    mode.add_argument(
        "--listen", metavar="ROOM",
        help="print the messages arriving in ROOM (wildcards allowed) until Ctrl-C",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="with --listen: one JSON object per message (room, sender, timestamp, body, "
        "destination, message_id)",
    )
    parser.add_argument(
        "--count", type=_positive, metavar="N", help="with --listen: exit after N messages",
    )
    return parser


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _check_files(cert: Path, key: Path, ca: Path) -> None:
    """Missing files, named with how to make them (pki's own errors cover unreadable ones)."""
    make_pair = f"`chat-certs client {cert.stem} --dir {cert.parent}`"
    if not cert.exists():
        raise UsageError(f"{cert}: no such certificate file; make one with {make_pair}")
    if not key.exists():
        raise UsageError(
            f"{key}: no such private key file; pass --key, or make a new pair with {make_pair}"
        )
    if not ca.exists():
        raise UsageError(
            f"{ca}: no such CA certificate file; pass --ca with the CA that signed the "
            f"server's certificate (`chat-certs init --dir {ca.parent}` makes a new CA)"
        )


def _passphrase(variable: str | None) -> bytes | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if value is None:
        raise UsageError(f"--passphrase-env {variable}: environment variable {variable} is not set")
    return value.encode()


# ---------------------------------------------------------------- running


class _Interrupts:
    """SIGINT/SIGTERM cancel the innermost scope opened with `stoppable()`.

    While connecting that is the whole run; once connected, only the chat mode, so the
    connection still closes politely (DISCONNECT, RECEIPT) on the way out.
    """

    def __init__(self) -> None:
        self._scopes: list[trio.CancelScope] = []
        self.received = False

    @contextmanager
    def stoppable(self) -> Iterator[None]:
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            try:
                yield
            finally:
                self._scopes.remove(scope)

    async def watch(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.received = True
                if self._scopes:
                    self._scopes[-1].cancel()


async def _run(options: Options) -> int:
    """The chosen mode, until it ends or a signal stops it."""
    interrupts = _Interrupts()
    try:
        await first_of(partial(_connected, options, interrupts), interrupts.watch)
    except TlsFailure as exc:  # name the file the refused check was about
        ours = options.cert if exc.rejected_by_server else options.ca
        files = f"we presented {ours}" if exc.rejected_by_server else f"our CA: {ours}"
        raise TlsFailure(f"{exc} ({files})", rejected_by_server=exc.rejected_by_server) from exc
    if interrupts.received and options.send is not None:
        return EXIT_INTERRUPTED
    return EXIT_OK


async def _connected(options: Options, interrupts: _Interrupts) -> None:
    heartbeat = (options.heartbeat_ms, options.heartbeat_ms)
    with interrupts.stoppable():
        async with open_chat(
            options.url, options.cert, options.key, options.ca,
            passphrase=options.passphrase, heartbeat=heartbeat,
        ) as client:
            with interrupts.stoppable():
                await _mode(options, client)


async def _mode(options: Options, client: StompClient) -> None:
    if options.send is not None:
        room, text = options.send
        await client.send(room_destination(room, wildcards=False), text)
    elif options.listen is not None:
        await _listen(client, options.listen, options.json, options.count)
    else:
        with Console.open() as console:
            await ChatSession(client, console).run(options.room)


async def _listen(client: StompClient, room: str, as_json: bool, count: int | None) -> None:
    """Print each message in `room` (one JSON object per line with `as_json`), flushed."""
    await client.subscribe(room_destination(room, wildcards=True))
    print(f"* listening on {room}", file=sys.stderr, flush=True)
    received = 0
    async for message in client:
        line = _json_line(message) if as_json else format_message(message)
        try:
            print(line, flush=True)
        except BrokenPipeError:  # the reader went away (`| head -1`): nothing left to do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        received += 1
        if count is not None and received >= count:
            return


def _json_line(message: Message) -> str:
    return json.dumps({
        "room": room_of(message.destination),
        "sender": message.sender,
        "timestamp": message.timestamp,
        "body": message.text,
        "destination": message.destination,
        "message_id": message.message_id,
    }, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
