"""The interactive chat: typed lines go to the current room, `/commands` manage rooms.

How this works: three tasks share one `ChatSession`. `_incoming` shows each session event.
`_typing` takes the console's lines and acts on commands at once; a text line goes into an
outbox that `_sending` drains, one send at a time, in the order typed. A send waits while the
link is down (up to the session's send timeout), so it never holds up typing: a line typed
while offline is shown as pending, then sent once the link is back or reported not
delivered. /quit and end of input leave once the outbox is empty; Ctrl-C on the screen
leaves at once and names what was not sent.

Where a line goes is the current target: a room, or a conversation `@NAME` (direct
messages, which arrive in our own inbox, subscribed at start, whoever sends them). A
plain room is joined together with its `/presence/ROOM`, which keeps `/who` and the
join/leave lines. The server answers a SUBSCRIBE or SEND its policy forbids with ERROR
and a closed connection, so the chat asks first (GET /auth/me, once per connection and
again before saying no, since the policy can change live) and says no itself.

The console is a prompt_toolkit screen on a terminal (chat/client/screen.py), or plain
lines when stdin or stdout is a pipe (`PlainConsole`): `open_console()` picks.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol, TextIO

import trio

from chat.client.display import (
    CONVERSATION,
    Styled,
    describe,
    error_line,
    help_line,
    is_wildcard,
    message_line,
    pending_line,
    plain,
    printable,
    recovery_gap,
    room_destination,
    room_of,
    system_line,
)
from chat.client.errors import ClientError, ReceiptTimeout, StompError
from chat.client.messages import Message, Presence, inbox, presence
from chat.client.resilient import Event, NotDelivered, Online, Reconnecting, Recovered, Refused
from chat.client.rights import Rights
from chat.protocol.errors import InvalidDestination, MalformedFrame
from chat.protocol.topics import PRESENCE_PREFIX
from chat.protocol.wire import IDENTITY

READ_CHUNK = 4096  # bytes per os.read() of a piped stdin
JOIN_BACKLOG = 20  # messages of a room shown on joining it, before the live ones
MAX_PENDING_LINES = 256  # typed lines not yet sent; a human never gets near it, a paste might
HISTORY_SUFFIX = ".history"  # typed lines are kept beside the refresh token: certs/NAME.history

HELP = (
    "commands:",
    "  /join ROOM      join ROOM and talk there (ROOM like lobby or dev.backend;",
    "                  * and # join many rooms at once, to listen only)",
    "  /dm NAME        talk to NAME alone: a conversation, shown as [@NAME]",
    "  /msg NAME TEXT  send TEXT to NAME alone, staying where you are",
    "  /leave [ROOM]   leave ROOM or @NAME (default: the current one)",
    "  /rooms          list the rooms joined and the conversations open",
    "  /who [ROOM]     who is in ROOM (default: the current room)",
    "  /help           this help",
    "  /quit           leave the chat once what you typed is sent (Ctrl-D too)",
    "  Ctrl-C          leave at once",
    "  PageUp/Down     page through the conversation; Up/Down recall what you typed",
    "anything else is sent to the current room or conversation; direct messages to you",
    "show up wherever you are, and someone joining or leaving your room is a * line",
)

Task = Callable[[], Awaitable[object]]


class End(Enum):
    """Why a console has no line to give."""

    EOF = "eof"  # Ctrl-D, or the end of a pipe: leave once what was typed is sent
    INTERRUPT = "interrupt"  # Ctrl-C on the screen: leave now


Typed = str | End


class Console(Protocol):
    """Where the chat meets the user."""

    def show(self, line: Styled) -> None:
        """Print one line (above the line being typed, on a screen)."""

    def link_changed(self, event: Online | Reconnecting, me: str) -> None:
        """The link went down, or came up."""

    def prompt_changed(self, prompt: str) -> None:
        """Where typed lines go changed while a line is being typed: show it at once."""

    async def read_line(self, prompt: str) -> Typed:
        """The next typed line, or why there is none."""


class ChatLink(Protocol):
    """What the chat needs of a session (`ResilientSession`)."""

    @property
    def user_name(self) -> str: ...

    @property
    def session(self) -> str: ...

    @property
    def online(self) -> bool: ...

    async def subscribe(self, destination: str, *, last: int = 0) -> None: ...

    async def unsubscribe(self, destination: str) -> None: ...

    async def rights(self, *, fresh: bool = False) -> Rights: ...

    async def send(self, destination: str, body: str, *, queued_at: float) -> None: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...


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


# ---------------------------------------------------------------- pipes


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


class PlainConsole:
    """Plain lines in and out, for pipes: no prompt, no colour, one line per status change."""

    def __init__(self, out: TextIO, fd: int) -> None:
        self._out = out
        self._lines = _FdLines(fd)
        self._ended = False

    def show(self, line: Styled) -> None:
        self._out.write(plain(line) + "\n")
        self._out.flush()

    def link_changed(self, event: Online | Reconnecting, me: str) -> None:
        status = describe(event)
        if status is not None:
            self.show(system_line(status))

    def prompt_changed(self, prompt: str) -> None:
        pass  # lines from a pipe have no prompt

    async def read_line(self, prompt: str) -> Typed:
        """The next line; End.EOF once, then nothing more (a pipe stays at its end)."""
        if self._ended:
            await trio.sleep_forever()
        line = await trio.to_thread.run_sync(self._lines.readline, abandon_on_cancel=True)
        if line is None:
            self._ended = True
            return End.EOF
        return line


def history_file(token_file: Path) -> Path:
    """Where typed lines are kept: beside the refresh token, e.g. certs/alice.history."""
    path = token_file.with_suffix(HISTORY_SUFFIX)
    return path if path != token_file else token_file.with_name(token_file.name + HISTORY_SUFFIX)


@asynccontextmanager
async def open_console(history: Path) -> AsyncIterator[Console]:
    """The screen on a terminal (typed lines kept in `history`), plain lines on pipes."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        yield PlainConsole(sys.stdout, sys.stdin.fileno())
        return
    from chat.client.screen import open_screen  # prompt_toolkit only for a terminal

    async with open_screen(history) as screen:
        yield screen


# ---------------------------------------------------------------- the chat session


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A typed line on its way to the room or conversation current when it was typed."""

    destination: str
    text: str
    typed_at: float  # trio time: the send timeout counts from here, not from its turn


class ChatSession:
    """One interactive chat: the rooms joined and conversations open (the targets), the
    current one, who is in each room, the commands, the outbox."""

    def __init__(self, session: ChatLink, console: Console) -> None:
        self._session = session
        self._console = console
        self._targets: list[str] = []  # rooms, and conversations as `@NAME`, in the order opened
        self._current: str | None = None
        self._members: dict[str, set[str]] = {}  # plain room -> who is in it, once known
        self._outbox_in, self._outbox = trio.open_memory_channel[Outgoing](MAX_PENDING_LINES)
        self._unsent: deque[Outgoing] = deque()  # in the outbox or being sent, in order
        self._in_flight: Outgoing | None = None
        self._commands: dict[str, Callable[[str], Awaitable[bool]]] = {
            "/join": self._join,
            "/leave": self._leave,
            "/rooms": self._list,
            "/who": self._who,
            "/msg": self._msg,
            "/dm": self._dm,
            "/help": self._help,
            "/quit": self._quit,
        }

    async def run(self, room: str) -> None:
        """Open our inbox, join `room`, then chat until the user leaves, or a ClientError
        (raised)."""
        session = self._session
        self._status(
            f"connected as {session.user_name} (session {session.session}); /help lists commands"
        )
        try:  # direct messages from anyone, the last few of them first
            await session.subscribe(inbox(session.user_name), last=JOIN_BACKLOG)
        except (StompError, ReceiptTimeout) as exc:
            self._error(f"direct messages to you will not show: {exc}")
        await self._join(room)
        try:
            await first_of(self._incoming, self._typing, self._sending)
        finally:
            self._report_unsent()

    # ------------------------------------------------------------ the three tasks

    async def _incoming(self) -> None:
        async for event in self._session:
            if isinstance(event, Message):
                self._received(event)
            elif isinstance(event, Recovered):
                if not event.ok:
                    self._status(recovery_gap(event))
            elif isinstance(event, Refused):
                await self._refused(event.destination)
            else:
                self._console.link_changed(event, self._session.user_name)

    async def _typing(self) -> None:
        """Lines until the user leaves; after /quit or end of input, wait for the outbox."""
        while True:
            line = await self._console.read_line(self._prompt())
            if line is End.INTERRUPT:
                return
            if line is End.EOF or not await self.handle(line.strip()):
                break
        self._outbox_in.close()  # `_sending` ends, and the chat with it, once it is empty
        while self._unsent:
            self._status(
                f"leaving once {len(self._unsent)} pending line(s) are sent; Ctrl-C leaves now"
            )
            if await self._console.read_line(self._prompt()) is End.INTERRUPT:
                return

    async def _sending(self) -> None:
        """Send the outbox in order; each line confirmed by the server, or reported."""
        async for outgoing in self._outbox:
            self._in_flight = outgoing
            try:
                await self._session.send(
                    outgoing.destination, outgoing.text, queued_at=outgoing.typed_at
                )
            except NotDelivered as exc:
                self._error(f"not delivered: {printable(outgoing.text)!r}: {exc}")
            self._in_flight = None
            self._unsent.popleft()

    def _report_unsent(self) -> None:
        """Leaving before the outbox was empty: say which lines may not have arrived."""
        for outgoing in self._unsent:
            text = repr(printable(outgoing.text))
            if outgoing is self._in_flight:
                self._error(f"left before the server confirmed {text}: it may not have arrived")
            else:
                self._error(f"not sent: {text}")
        self._unsent.clear()

    # ------------------------------------------------------------ what arrives

    def _received(self, message: Message) -> None:
        if message.destination.startswith(PRESENCE_PREFIX):
            self._presence(message)
            return
        me = self._session.user_name
        if message.direct and not message.history:  # someone talks to us: a conversation
            self._open(CONVERSATION + message.other_party(me))
        self._console.show(message_line(message, me))

    def _presence(self, message: Message) -> None:
        """Keep who is in the room; a line when someone else comes or goes."""
        try:
            news = Presence.of(message)
        except MalformedFrame as exc:
            self._error(f"who is in {message.destination}: {exc.message}")
            return
        if news.change == "snapshot":  # the first news, and the first after a reconnect
            self._members[news.room] = set(news.names)
            return
        members = self._members.get(news.room)
        if members is None:  # a room just left
            return
        for who in news.names:
            if news.change == "join":
                members.add(who)
            else:
                members.discard(who)
            if who != self._session.user_name:  # we know where we are
                verb = "joined" if news.change == "join" else "left"
                self._status(f"{printable(who)} {verb} {printable(news.room)}")

    async def _refused(self, destination: str) -> None:
        """The policy changed under a room we were in: we are out of it, say so."""
        room = room_of(destination)
        if room not in self._targets:  # its presence: the room itself is reported
            return
        self._targets.remove(room)
        if not is_wildcard(room):
            self._members.pop(room, None)
            await self._session.unsubscribe(presence(room))  # refused too: never retried
        if self._current == room:  # never send what is being typed somewhere else instead
            self._current = None
            self._console.prompt_changed(self._prompt())
        self._error(f"the server's policy does not let you read {room} (any more): left it")

    # ------------------------------------------------------------ commands

    async def handle(self, line: str) -> bool:
        """Act on one typed line; False once the user asked to leave."""
        if not line:
            return True
        if not line.startswith("/"):
            await self._say(line)
            return True
        name, _, rest = line.partition(" ")
        command = self._commands.get(name.lower())
        if command is None:
            self._status(f"unknown command {name}; /help lists the commands")
            return True
        return await command(rest.strip())

    async def _say(self, text: str) -> None:
        target = self._current
        if target is None:
            self._status("you are in no room: /join ROOM or /dm NAME first")
        elif target.startswith(CONVERSATION):
            self._queue(inbox(target.removeprefix(CONVERSATION)), text)
        elif is_wildcard(target):
            self._status(f"{target} is a wildcard room, for listening; /join a plain room")
        elif not await self._allowed(lambda rights: rights.may_publish(target)):
            self._error(f"you may not talk in {target}: not sent: {printable(text)!r}")
        else:
            self._queue(room_destination(target, wildcards=False), text)

    def _queue(self, destination: str, text: str) -> None:
        """Into the outbox, sent in turn; shown as pending when it cannot go at once."""
        if len(self._unsent) >= MAX_PENDING_LINES:
            self._error(f"not sent: {printable(text)!r}: {MAX_PENDING_LINES} lines already wait")
            return
        if self._unsent or not self._session.online:
            self._console.show(pending_line(text))
        outgoing = Outgoing(destination, text, trio.current_time())
        self._unsent.append(outgoing)
        self._outbox_in.send_nowait(outgoing)  # room for it: checked above

    async def _join(self, rest: str) -> bool:
        args = rest.split()
        if len(args) != 1:
            self._status("usage: /join ROOM")
            return True
        room = room_of(args[0])
        if room.startswith(CONVERSATION):
            self._status(f"{room} is a conversation: /dm {room.removeprefix(CONVERSATION)}")
            return True
        if room in self._targets:
            self._current = room
            self._status(f"now talking in {room}")
            return True
        try:
            destination = room_destination(room, wildcards=True)
        except InvalidDestination as exc:
            self._status(str(exc))
            return True
        if not await self._allowed(lambda rights: rights.may_join(room)):
            self._error(f"you may not join {room}")
            return True
        try:
            if is_wildcard(room):  # many topics: no one history to show, no members
                await self._session.subscribe(destination)
            else:
                await self._session.subscribe(destination, last=JOIN_BACKLOG)
        except (StompError, ReceiptTimeout) as exc:  # refused, or no answer: the chat goes on
            self._error(f"cannot join {room}: {exc}")
            return True
        self._open(room)
        self._current = room
        self._status(f"joined {room}")
        if not is_wildcard(room):
            await self._follow(room)
        return True

    async def _follow(self, room: str) -> None:
        """Subscribe to who comes and goes in `room` (after joining it: we are in the
        snapshot, so no line announces us)."""
        try:
            await self._session.subscribe(presence(room))
        except (StompError, ReceiptTimeout) as exc:
            self._error(f"who is in {room} will not be known: {exc}")

    async def _leave(self, rest: str) -> bool:
        args = rest.split()
        if len(args) > 1:
            self._status("usage: /leave [ROOM or @NAME]")
            return True
        target = room_of(args[0]) if args else self._current
        if target is None or target not in self._targets:
            self._status(f"you are not in {target}" if target else "you are in no room")
            return True
        self._targets.remove(target)
        if not target.startswith(CONVERSATION):  # a conversation is our inbox: it stays
            if not is_wildcard(target):
                self._members.pop(target, None)
                await self._session.unsubscribe(presence(target))
            await self._session.unsubscribe(room_destination(target, wildcards=True))
        if self._current == target:
            self._current = self._targets[-1] if self._targets else None
        now = f"; now talking in {self._current}" if self._current else ""
        self._status(f"left {target}{now}")
        return True

    async def _list(self, rest: str) -> bool:
        if not self._targets:
            self._status("you are in no room: /join ROOM")
            return True
        rooms = [self._marked(t) for t in self._targets if not t.startswith(CONVERSATION)]
        talks = [self._marked(t) for t in self._targets if t.startswith(CONVERSATION)]
        parts = [f"rooms: {', '.join(rooms)}"] if rooms else []
        if talks:
            parts.append(f"conversations: {', '.join(talks)}")
        self._status("; ".join(parts))
        return True

    async def _who(self, rest: str) -> bool:
        args = rest.split()
        if len(args) > 1:
            self._status("usage: /who [ROOM]")
            return True
        room = room_of(args[0]) if args else self._current
        if room is None or room not in self._targets:
            self._status(f"you are not in {room}" if room else "you are in no room")
        elif room.startswith(CONVERSATION):
            self._status(f"{room} is you and {room.removeprefix(CONVERSATION)}")
        elif is_wildcard(room):
            self._status(f"{room} is a wildcard room: /who works in a plain room")
        elif (members := self._members.get(room)) is None:
            self._status(f"who is in {room} is not known yet")
        else:
            self._status(f"in {room}: {', '.join(sorted(members))}")
        return True

    async def _msg(self, rest: str) -> bool:
        target, _, text = rest.partition(" ")
        name = await self._correspondent(target, "/msg NAME TEXT", bool(text.strip()))
        if name is not None:
            self._open(CONVERSATION + name)
            self._queue(inbox(name), text.strip())
        return True

    async def _dm(self, rest: str) -> bool:
        name = await self._correspondent(rest, "/dm NAME", " " not in rest)
        if name is not None:
            self._open(CONVERSATION + name)
            self._current = CONVERSATION + name
            self._status(f"now talking to {name}: lines you type go to {name} alone")
        return True

    async def _correspondent(self, typed: str, usage: str, complete: bool) -> str | None:
        """The NAME (or @NAME) typed, if it is one we may send direct messages to."""
        name = typed.removeprefix(CONVERSATION)
        if not name or not complete:
            self._status(f"usage: {usage}")
        elif IDENTITY.fullmatch(name) is None:
            self._status(f"{printable(name)!r} is not a name (1-64 of A-Z a-z 0-9 _ . @ -)")
        elif not await self._allowed(lambda rights: rights.may_message(name)):
            self._error(f"you may not message {name}")
        else:
            return name
        return None

    async def _help(self, rest: str) -> bool:
        for line in HELP:
            self._console.show(help_line(line))
        return True

    async def _quit(self, rest: str) -> bool:
        return False

    # ------------------------------------------------------------ targets and rights

    def _open(self, target: str) -> None:
        if target not in self._targets:
            self._targets.append(target)

    def _marked(self, target: str) -> str:
        return f"{target} (current)" if target == self._current else target

    async def _allowed(self, check: Callable[[Rights], bool]) -> bool:
        """Whether the policy allows it, as far as we can tell: a refusal is checked again
        with fresh rights (the policy may have just changed). When we cannot ask (offline,
        a server without /auth/me), the server decides."""
        for fresh in (False, True):
            try:
                if check(await self._session.rights(fresh=fresh)):
                    return True
            except ClientError:
                return True
        return False

    # ------------------------------------------------------------ output

    def _prompt(self) -> str:
        return f"[{self._current}] > " if self._current else "> "

    def _status(self, text: str) -> None:
        self._console.show(system_line(text))

    def _error(self, text: str) -> None:
        self._console.show(error_line(text))
