"""The interactive chat UI: typed lines go to the current room, `/commands` manage rooms.

How the screen stays readable: input() runs in a worker thread (with the stdlib
`readline` on a terminal) while the trio task prints incoming messages. On a terminal
each incoming line first clears the line being typed (`\\r` + erase-line), prints the
message, then redraws the prompt and what the user had typed so far
(`readline.get_line_buffer()`), so typing is never garbled. When stdin or stdout is not
a terminal, lines are read and printed plainly.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TextIO

import trio

from chat.client.connection import Message, ReceiptTimeout, StompError
from chat.client.resilient import (
    Event,
    NotDelivered,
    Online,
    Reconnecting,
    Recovered,
    ResilientSession,
)
from chat.errors import InvalidDestination
from chat.topics import ANY, ONE, TOPIC_PREFIX, parse_destination

READ_CHUNK = 4096  # bytes per os.read() of a piped stdin
CLEAR_LINE = "\r\x1b[K"  # carriage return + ANSI "erase to end of line"
CONTINUATION = "\n    "  # later lines of a multi-line message are indented under the first
# C0 and C1 control characters (but tab and newline): a message must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

HELP = (
    "commands:",
    "  /join ROOM     join ROOM and talk there (ROOM like lobby or dev.backend;",
    "                 * and # join many rooms at once, to listen only)",
    "  /leave [ROOM]  leave ROOM (default: the current room)",
    "  /rooms         list the rooms joined",
    "  /help          this help",
    "  /quit          leave the chat (Ctrl-D and Ctrl-C too)",
    "anything else is sent to the current room",
)

Task = Callable[[], Awaitable[object]]


# ---------------------------------------------------------------- rooms and formatting


def room_destination(room: str, *, wildcards: bool) -> str:
    """`dev.backend` -> `/topic/dev.backend`, checked with the server's own rules."""
    destination = room if room.startswith(TOPIC_PREFIX) else TOPIC_PREFIX + room
    parse_destination(destination, wildcards=wildcards)
    return destination


def room_of(destination: str) -> str:
    return destination.removeprefix(TOPIC_PREFIX)


def is_wildcard(room: str) -> bool:
    return any(segment in (ONE, ANY) for segment in room.split("."))


def printable(text: str) -> str:
    """`text` with control characters replaced, lines after the first indented."""
    lines = [_CONTROL.sub("\N{REPLACEMENT CHARACTER}", line) for line in text.splitlines()]
    return CONTINUATION.join(lines)


def format_message(message: Message) -> str:
    """`HH:MM:SS [room] sender: text`, the time from the server's `timestamp` header."""
    clock = time.strftime("%H:%M:%S", time.localtime(message.timestamp / 1000))
    room = printable(room_of(message.destination))
    return f"{clock} [{room}] {printable(message.sender)}: {printable(message.text)}"


def describe(event: Event) -> str | None:
    """The status line for a session event worth showing (without the `* `), else None."""
    if isinstance(event, Reconnecting):
        return (
            f"reconnecting\N{HORIZONTAL ELLIPSIS} (attempt {event.attempt}, next try in "
            f"{event.delay:.1f} s): {printable(event.reason)}"
        )
    if isinstance(event, Online) and not event.first:
        return "back online"
    if isinstance(event, Recovered) and not event.ok:
        room = printable(room_of(event.destination))
        return f"{room}: messages sent while you were away may be missing"
    return None


# ---------------------------------------------------------------- concurrency


async def first_of(*tasks: Task) -> None:
    """Run `tasks` until one finishes, then cancel the rest.

    An exception from any task ends them all and is raised as itself (not as a group).
    """
    errors: list[Exception] = []

    async def run(task: Task, scope: trio.CancelScope) -> None:
        try:
            await task()
        except Exception as exc:  # re-raised below, outside the nursery
            errors.append(exc)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(run, task, nursery.cancel_scope)
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- the console


class _FdLines:
    """Lines from a file descriptor via os.read: a thread blocked here holds no Python lock
    (a blocked sys.stdin.readline() would make interpreter shutdown abort)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self._eof = False

    def readline(self) -> str | None:
        while b"\n" not in self._buffer and not self._eof:
            chunk = os.read(self._fd, READ_CHUNK)
            self._eof = not chunk
            self._buffer += chunk
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").removesuffix("\r")


class Console:
    """Where the chat meets the user: a readline terminal, or plain pipes."""

    def __init__(self, out: TextIO, readline: ModuleType | None) -> None:
        self._out = out
        self._readline = readline  # None: not a terminal, read plain lines
        self._prompt: str | None = None  # set while a line is being typed
        self._lines = _FdLines(sys.stdin.fileno()) if readline is None else None

    @classmethod
    @contextmanager
    def open(cls) -> Iterator[Console]:
        """The process's console; on a terminal, its settings are restored on the way out."""
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            yield cls(sys.stdout, None)
            return
        # Imported only for a terminal: importing readline enables line editing in input()
        # and may write terminal escapes, which have no place in a pipe.
        import readline
        import termios

        saved = termios.tcgetattr(sys.stdin.fileno())
        try:
            yield cls(sys.stdout, readline)
        finally:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)

    def show(self, line: str) -> None:
        """Print one line above the line being typed, then redraw the prompt and typing."""
        if self._prompt is None or self._readline is None:
            self._out.write(f"{line}\n")
        else:
            typed = self._readline.get_line_buffer()
            self._out.write(f"{CLEAR_LINE}{line}\n{self._prompt}{typed}")
        self._out.flush()

    def status(self, text: str) -> None:
        """A status line (joined, left, errors): set apart from chat lines by a `*`."""
        self.show(f"* {text}")

    async def read_line(self, prompt: str) -> str | None:
        """The next typed line, or None at end of input (Ctrl-D)."""
        if self._lines is not None:
            return await trio.to_thread.run_sync(self._lines.readline, abandon_on_cancel=True)
        self._prompt = prompt
        try:
            return await trio.to_thread.run_sync(input, prompt, abandon_on_cancel=True)
        except EOFError:  # Ctrl-D: leave the cursor on a fresh line
            self._out.write("\n")
            return None
        except trio.Cancelled:  # leaving mid-line (Ctrl-C, connection lost): clear the prompt
            self._out.write(CLEAR_LINE)
            raise
        finally:
            self._prompt = None
            self._out.flush()


# ---------------------------------------------------------------- the chat session


class ChatSession:
    """One interactive chat: the rooms joined, the current room, the commands."""

    def __init__(self, session: ResilientSession, console: Console) -> None:
        self._session = session
        self._console = console
        self._rooms: list[str] = []  # in the order joined
        self._current: str | None = None
        self._commands: dict[str, Callable[[list[str]], Awaitable[bool]]] = {
            "/join": self._join,
            "/leave": self._leave,
            "/rooms": self._list,
            "/help": self._help,
            "/quit": self._quit,
        }

    async def run(self, room: str) -> None:
        """Join `room`, then chat until /quit, end of input, or a ClientError (raised)."""
        session = self._session
        self._console.status(
            f"connected as {session.user_name} (session {session.session}); /help lists commands"
        )
        await self._join([room])
        await first_of(self._incoming, self._typing)

    async def _incoming(self) -> None:
        async for event in self._session:
            if isinstance(event, Message):
                self._console.show(format_message(event))
                continue
            status = describe(event)
            if status is not None:
                self._console.status(status)

    async def _typing(self) -> None:
        while True:
            prompt = f"[{self._current}] > " if self._current else "> "
            line = await self._console.read_line(prompt)
            if line is None or not await self.handle(line.strip()):
                return

    async def handle(self, line: str) -> bool:
        """Act on one typed line; False once the user asked to leave."""
        if not line:
            return True
        if not line.startswith("/"):
            await self._say(line)
            return True
        name, *args = line.split()
        command = self._commands.get(name.lower())
        if command is None:
            self._console.status(f"unknown command {name}; /help lists the commands")
            return True
        return await command(args)

    async def _say(self, text: str) -> None:
        room = self._current
        if room is None:
            self._console.status("you are in no room: /join ROOM first")
        elif is_wildcard(room):
            self._console.status(f"{room} is a wildcard room, for listening; /join a plain room")
        else:
            try:
                await self._session.send(room_destination(room, wildcards=False), text)
            except NotDelivered as exc:
                self._console.status(f"not delivered: {printable(text)!r}: {exc}")

    async def _join(self, args: list[str]) -> bool:
        if len(args) != 1:
            self._console.status("usage: /join ROOM")
            return True
        room = room_of(args[0])
        if room in self._rooms:
            self._current = room
            self._console.status(f"now talking in {room}")
            return True
        try:
            destination = room_destination(room, wildcards=True)
        except InvalidDestination as exc:
            self._console.status(str(exc))
            return True
        try:
            await self._session.subscribe(destination)
        except (StompError, ReceiptTimeout) as exc:  # refused, or no answer: the chat goes on
            self._console.status(f"cannot join {room}: {exc}")
            return True
        self._rooms.append(room)
        self._current = room
        self._console.status(f"joined {room}")
        return True

    async def _leave(self, args: list[str]) -> bool:
        if len(args) > 1:
            self._console.status("usage: /leave [ROOM]")
            return True
        room = room_of(args[0]) if args else self._current
        if room is None or room not in self._rooms:
            self._console.status(f"you are not in {room}" if room else "you are in no room")
            return True
        self._rooms.remove(room)
        await self._session.unsubscribe(room_destination(room, wildcards=True))
        if self._current == room:
            self._current = self._rooms[-1] if self._rooms else None
        now = f"; now talking in {self._current}" if self._current else ""
        self._console.status(f"left {room}{now}")
        return True

    async def _list(self, args: list[str]) -> bool:
        if not self._rooms:
            self._console.status("you are in no room: /join ROOM")
            return True
        names = [f"{room} (current)" if room == self._current else room for room in self._rooms]
        self._console.status("rooms: " + ", ".join(names))
        return True

    async def _help(self, args: list[str]) -> bool:
        for line in HELP:
            self._console.show(line)
        return True

    async def _quit(self, args: list[str]) -> bool:
        return False
