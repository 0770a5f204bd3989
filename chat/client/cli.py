"""`chat-client`: the terminal chat client, interactive or scriptable (--send, --listen).

Every error is one line on stderr starting with "chat-client: " and exit status 2, never
a traceback. Ctrl-C, Ctrl-D and /quit leave cleanly (DISCONNECT, wait for its RECEIPT).
Interactive and --listen sessions reconnect by themselves and resume where they left off;
--send is one-shot (it only retries a server that is unreachable at first).
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

import trio

from chat.cli_common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    UsageError,
    add_passphrase_option,
    run_main,
)
from chat.client.auth import default_token_file, open_chat
from chat.client.display import (
    CONVERSATION,
    describe,
    error_line,
    format_message,
    room_destination,
    where,
)
from chat.client.errors import ClientError, TlsFailure, TokenRefused
from chat.client.messages import Message, inbox
from chat.client.resilient import Refused, ResilientSession, open_session
from chat.client.terminal import ChatSession, Console, first_of, history_file, open_console
from chat.pki import PkiError, rejection_cause
from chat.protocol.errors import InvalidDestination
from chat.protocol.wire import IDENTITY

PROG = "chat-client"
DEFAULT_URL = "wss://127.0.0.1:8443/ws"  # chat-server's default listener
DEFAULT_ROOM = "lobby"
DEFAULT_HEARTBEAT_MS = 10_000  # the server's own offer (PROTOCOL.md §5)
SEND_ATTEMPTS = 4  # --send: tries while the server is unreachable, then the error

# What to do about a refused token (PROTOCOL.md §2, §7), added to the error line.
_REFUSAL_HINTS = {
    "identity_revoked": "the server's operator has revoked this certificate's identity; "
    "ask them to reinstate it (chat-server unrevoke --sub NAME)",
    "token_revoked": "the server's operator has revoked this token; ask them why",
    "token_expired": "a token fresh from the server was already expired there: check this "
    "computer's clock",
}

DESCRIPTION = """\
Chat over STOMP 1.2 / WebSocket / mutual TLS. Your certificate is your identity: the
client fetches an access token with it (POST /auth/token), connects, and joins a room.

Interactive (the default): typed lines go to the current room or conversation; /join ROOM,
/dm NAME, /msg NAME TEXT, /leave [ROOM or @NAME], /rooms, /who [ROOM], /help, /quit.
Incoming messages show time, room and sender (the date too when not from today); lines
starting with * are status lines (someone joining or leaving your room, too). Joining a
room shows its last 20 messages first, in grey. /quit and Ctrl-D leave once the lines
typed are sent; Ctrl-C leaves at once. On a terminal the bottom line is the connection's
state; a lost connection is retried by itself ("reconnecting... attempt 3, next try in
1.2 s") and what was missed meanwhile is shown in order. Lines typed while offline show as
pending and are sent once it is back (or reported not delivered). PageUp/PageDown page
through the conversation; the arrow keys recall lines typed before, kept beside the
refresh token (certs/alice.history, mode 0600). NO_COLOR=1 turns colours off. Through
pipes, lines are read and written plainly.

The refresh token that saves a new token request on each start is kept beside the
certificate (certs/alice.refresh, mode 0600) or at --token-file.

Rooms are topic names: lobby, dev.backend, ... ; /join (and --listen) also take the
wildcards * (one segment: dev.*) and # (any number of segments: dev.#), to listen.

Direct messages: /msg bob TEXT sends TEXT to bob alone; /dm bob makes the conversation
with bob current, so typed lines go to him. A conversation shows as [@bob], on both sides
and on every device of either: [@bob] alice: hi is what alice wrote to bob. Direct
messages to you show up wherever you are (the last 20 at start, in grey).

What you may do is the server's policy (rooms you may read and write, whom you may
message): the client asks it first (GET /auth/me) and says "you may not join ROOM" or
"you may not message NAME" rather than have the server close the connection.

Scriptable:
  chat-client --cert certs/alice.crt --send lobby "hello"
  chat-client --cert certs/alice.crt --send @bob "hello, bob only"
  chat-client --cert certs/bob.crt --listen lobby --json --count 1
  chat-client --cert certs/bob.crt --listen @alice    (the conversation with alice)
  chat-client --cert certs/bob.crt --listen @         (every direct message to or from bob)

Exit status: 0 on success and on leaving with Ctrl-C, Ctrl-D or /quit; 2 on an error no
reconnect can cure (a refused certificate or token, a --send cut off or forbidden by the
policy, a --listen room the policy takes away), with one line on stderr; 130 when Ctrl-C
cuts a --send short.
"""


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    cert: Path
    key: Path
    ca: Path
    passphrase: bytes | None = field(repr=False)
    token_file: Path
    heartbeat_ms: int
    room: str
    send: tuple[str, str] | None  # (room or @NAME, text)
    listen: str | None  # a room, @NAME or @
    json: bool
    count: int | None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client; returns the exit status (see the module docstring)."""
    return run_main(
        PROG,
        lambda: trio.run(_run, parse_options(argv)),
        (ClientError, PkiError, InvalidDestination),
        explain=_explained,
    )


def _explained(exc: Exception) -> str:
    """The error's line, with what to do about it when we know."""
    hint = _REFUSAL_HINTS.get(exc.code) if isinstance(exc, TokenRefused) else None
    return f"{exc}; {hint}" if hint else str(exc)


class _Notices:
    """Token warnings the user should see: one line on stderr, or on the chat's screen
    while there is one (a line on stderr would tear through it)."""

    def __init__(self) -> None:
        self.console: Console | None = None

    def __call__(self, text: str) -> None:
        if self.console is not None:
            self.console.show(error_line(text))
        else:
            print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _status(text: str) -> None:
    """A status line of a --listen run: on stderr, so stdout stays the messages only."""
    print(f"* {text}", file=sys.stderr, flush=True)


def parse_options(argv: Sequence[str] | None) -> Options:
    args = _build_parser().parse_args(argv)
    if (args.json or args.count is not None) and args.listen is None:
        raise UsageError(f"--json and --count go with --listen (see '{PROG} --help')")
    cert: Path = args.cert
    key: Path = args.key or cert.with_suffix(".key")
    ca: Path = args.ca or cert.parent / "ca.crt"
    _check_files(cert, key, ca)
    if args.send is not None:
        send_destination(args.send[0])
    if args.listen is not None and args.listen.startswith(CONVERSATION):
        _correspondent(args.listen, allow_everyone=True)
    else:
        room_destination(args.listen or args.room, wildcards=True)
    return Options(
        url=args.url,
        cert=cert,
        key=key,
        ca=ca,
        passphrase=args.passphrase,
        token_file=args.token_file or default_token_file(cert),
        heartbeat_ms=args.heartbeat,
        room=args.room,
        send=tuple(args.send) if args.send is not None else None,
        listen=args.listen,
        json=args.json,
        count=args.count,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cert",
        type=Path,
        required=True,
        metavar="FILE",
        help="your client certificate (its CN is your name), e.g. certs/alice.crt",
    )
    parser.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="its private key (default: the certificate's name with .key, beside it)",
    )
    parser.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="the CA certificate that signed the server's (default: ca.crt beside --cert)",
    )
    add_passphrase_option(
        parser, "the key is encrypted: its passphrase is in environment variable VAR"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="where to keep the refresh token between runs, owner-only (default: the "
        "certificate's name with .refresh, beside it)",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        metavar="URL",
        help="the server's STOMP endpoint; tokens come from https:// on the same host and "
        f"port (default: {DEFAULT_URL})",
    )
    parser.add_argument(
        "--room",
        default=DEFAULT_ROOM,
        help=f"the room to join at start, interactive mode (default: {DEFAULT_ROOM})",
    )
    parser.add_argument(
        "--heartbeat",
        type=_non_negative,
        default=DEFAULT_HEARTBEAT_MS,
        metavar="MS",
        help="STOMP heart-beat interval offered both ways, in ms; a server silent for twice "
        "the agreed interval is taken for dead and reconnected to; 0 turns them off "
        f"(default: {DEFAULT_HEARTBEAT_MS})",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--send",
        nargs=2,
        metavar=("ROOM", "TEXT"),
        help="send TEXT to ROOM (or to NAME alone with @NAME), wait until the server has "
        "stored it, and exit",
    )
    mode.add_argument(
        "--listen",
        metavar="ROOM",
        help="print the messages arriving in ROOM (wildcards allowed) until Ctrl-C; @NAME: "
        "the direct messages between you and NAME (@yourself: your notes to yourself); "
        "@ alone: every direct message to or from you",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --listen: one JSON object per message (room, sender, timestamp, body, "
        "destination, message_id, and for a direct message to; room is @NAME for one)",
    )
    parser.add_argument(
        "--count",
        type=_positive,
        metavar="N",
        help="with --listen: exit after N messages",
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
    except TlsFailure as exc:  # name the file the refused check was about, and why if we can
        cause = rejection_cause(options.cert, options.ca) if exc.rejected_by_server else None
        if cause is not None:
            said = f"{exc}: {cause}"
        elif exc.rejected_by_server:
            said = f"{exc} (we presented {options.cert})"
        else:
            said = f"{exc} (our CA: {options.ca})"
        raise TlsFailure(said, rejected_by_server=exc.rejected_by_server) from exc
    if interrupts.received and options.send is not None:
        return EXIT_INTERRUPTED
    return EXIT_OK


async def _connected(options: Options, interrupts: _Interrupts) -> None:
    heartbeat = (options.heartbeat_ms, options.heartbeat_ms)
    notices = _Notices()
    with interrupts.stoppable():
        if options.send is not None:
            await _send(options, interrupts, heartbeat, notices, *options.send)
            return
        async with open_session(
            options.url,
            options.cert,
            options.key,
            options.ca,
            passphrase=options.passphrase,
            token_file=options.token_file,
            on_notice=notices,
            heartbeat=heartbeat,
        ) as session:
            with interrupts.stoppable():
                await _mode(options, session, notices)


async def _send(
    options: Options,
    interrupts: _Interrupts,
    heartbeat: tuple[int, int],
    notices: _Notices,
    room: str,
    text: str,
) -> None:
    """One-shot: connect (retrying an unreachable server a few times), send, wait for the
    RECEIPT that says the server stored it."""
    async with open_chat(
        options.url,
        options.cert,
        options.key,
        options.ca,
        passphrase=options.passphrase,
        token_file=options.token_file,
        on_notice=notices,
        heartbeat=heartbeat,
        attempts=SEND_ATTEMPTS,
    ) as client:
        with interrupts.stoppable():
            await client.send(send_destination(room), text)


async def _mode(options: Options, session: ResilientSession, notices: _Notices) -> None:
    if options.listen is not None:
        await _listen(session, options.listen, options.json, options.count)
        return
    async with open_console(history_file(options.token_file)) as console:
        notices.console = console
        try:
            await ChatSession(session, console).run(options.room)
        finally:
            notices.console = None


async def _listen(session: ResilientSession, room: str, as_json: bool, count: int | None) -> None:
    """Print each message in `room` (one JSON object per line with `as_json`), flushed;
    status lines (reconnecting, back online) go to stderr. `@NAME`: our inbox, only the
    conversation with NAME; `@`: all of it."""
    me = session.user_name
    if room.startswith(CONVERSATION):
        await session.subscribe(inbox(me))
    else:
        await session.subscribe(room_destination(room, wildcards=True))
    _status(f"listening on {room}")
    received = 0
    async for event in session:
        if isinstance(event, Refused):  # nothing more will come
            raise ClientError(f"listening on {room} ended: {event.reason}")
        if not isinstance(event, Message):
            status = describe(event)
            if status is not None:
                _status(status)
        elif not _wanted(event, room, me):
            continue
        elif not _print(_json_line(event, me) if as_json else format_message(event, me)):
            return
        else:
            received += 1
            if count is not None and received >= count:
                return


def _wanted(message: Message, listened: str, me: str) -> bool:
    """Whether --listen shows `message`: all of a room, one conversation of an inbox."""
    name = listened.removeprefix(CONVERSATION)
    return name == listened or not name or message.other_party(me) == name


def _print(line: str) -> bool:
    """Print a line of output, flushed; False once nobody reads it any more."""
    try:
        print(line, flush=True)
    except BrokenPipeError:  # the reader went away (`| head -1`): nothing left to do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True


def _json_line(message: Message, me: str) -> str:
    record: dict[str, object] = {
        "room": where(message, me),
        "sender": message.sender,
        "timestamp": message.timestamp,
        "body": message.text,
        "destination": message.destination,
        "message_id": message.message_id,
    }
    if message.to is not None:
        record["to"] = message.to
    return json.dumps(record, ensure_ascii=False)


def send_destination(target: str) -> str:
    """Where --send goes: `@NAME` is NAME's inbox, anything else a plain room."""
    if target.startswith(CONVERSATION):
        return inbox(_correspondent(target, allow_everyone=False))
    return room_destination(target, wildcards=False)


def _correspondent(target: str, *, allow_everyone: bool) -> str:
    """NAME of `@NAME`, checked; "" for `@` alone when `allow_everyone`."""
    name = target.removeprefix(CONVERSATION)
    if (name or not allow_everyone) and IDENTITY.fullmatch(name) is None:
        everyone = " (@ alone: your whole inbox)" if allow_everyone else ""
        raise UsageError(f"{target!r}: @NAME needs a name of 1-64 of A-Z a-z 0-9 _ . @ -{everyone}")
    return name


if __name__ == "__main__":
    sys.exit(main())
