"""The chat's terminal UI, compared as rendered screens.

The screen (chat/client/screen.py) runs with prompt_toolkit's pipe input and a Vt100 output
whose bytes feed `pyte`, a terminal emulator of a fixed size; the tests type into the
pipe and assert the emulator's screen lines exactly. The session is `FakeLink`, a
stand-in for the network peer whose link the test switches off and on.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as clock_time
from pathlib import Path

import pyte
import pytest
import trio
from prompt_toolkit.data_structures import Size
from prompt_toolkit.input import PipeInput, create_pipe_input
from prompt_toolkit.output.vt100 import Vt100_Output

from chat.client.connection import ConnectionLost, Message
from chat.client.display import clock
from chat.client.resilient import Event, NotDelivered, Online, Reconnecting
from chat.client.rights import Rights
from chat.client.screen import HISTORY_FILE_MODE, MAX_HISTORY_ENTRIES, Screen, open_screen
from chat.client.terminal import ChatSession, PlainConsole, history_file

FAST = 10  # seconds: a safety net only; every wait below ends on what the screen shows
TODAY_9AM = int(datetime.combine(date.today(), clock_time(9, 8, 33)).timestamp() * 1000)
SGR = re.compile(r"\x1b\[([0-9;]*)m")
COLOUR_PARAMETERS = {*range(30, 39), *range(40, 49), *range(90, 98), *range(100, 108)}


# ---------------------------------------------------------------- a terminal to look at


class Terminal:
    """A terminal of a fixed size: what the screen writes, rendered by pyte."""

    def __init__(self, columns: int, rows: int) -> None:
        self.screen = pyte.Screen(columns, rows)
        self._stream = pyte.Stream(self.screen)
        self._lock = threading.Lock()  # the screen's thread writes, the test reads
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()
        self.written = io.StringIO()
        self.encoding = "utf-8"
        self.output = Vt100_Output(self, self.size, term="xterm")

    # the file-like side, written by prompt_toolkit in the screen's thread

    def write(self, data: str) -> int:
        with self._lock:
            self._stream.feed(data)
            self.written.write(data)
        self._token.run_sync_soon(self._wake)
        return len(data)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # the test's side

    def size(self) -> Size:
        with self._lock:
            return Size(rows=self.screen.lines, columns=self.screen.columns)

    def resize(self, columns: int, rows: int) -> None:
        with self._lock:
            self.screen.resize(rows, columns)

    def lines(self) -> list[str]:
        with self._lock:
            return [line.rstrip() for line in self.screen.display]

    def char(self, row: int, column: int) -> pyte.screens.Char:
        with self._lock:
            return self.screen.buffer[row][column]

    def find(self, text: str) -> tuple[int, int]:
        """Row and column of `text`'s first character on the screen."""
        for row, line in enumerate(self.lines()):
            if text in line:
                return row, line.index(text)
        raise AssertionError(f"{text!r} is not on the screen:\n" + "\n".join(self.lines()))

    async def until(self, check: Callable[[list[str]], bool]) -> list[str]:
        """Wait until the screen passes `check`; its lines."""
        with trio.move_on_after(FAST):
            while True:
                changed = self._changed
                lines = self.lines()
                if check(lines):
                    return lines
                await changed.wait()
        raise AssertionError("the screen never got there:\n" + "\n".join(self.lines()))

    async def shows(self, expected: list[str]) -> None:
        """Wait until the screen is exactly `expected` (rows padded with blank lines)."""
        padded = expected + [""] * (self.screen.lines - len(expected))
        assert len(padded) == self.screen.lines, expected
        await self.until(lambda lines: lines == padded)

    async def has(self, text: str) -> list[str]:
        return await self.until(lambda lines: any(text in line for line in lines))


def wrapped(text: str, columns: int) -> list[str]:
    """`text` as a screen of `columns` wraps it (trailing blanks are not seen)."""
    return [text[i : i + columns].rstrip() for i in range(0, len(text), columns)]


# ---------------------------------------------------------------- a peer to talk to


EVERYTHING = Rights.of(  # the server's default policy (PROTOCOL.md §9)
    {"sub": "alice", "subscribe": ["#"], "publish": ["#"], "message": ["*"], "admin": False}
)


class FakeLink:
    """The session surface the chat uses, with a link the test switches off and on.

    Like the server, it echoes every message sent (stamped `TODAY_9AM`): a direct message
    comes back as our own copy, in our inbox. A send waits while the link is down, until
    it is back or `give_up()` is called. `policy` is what GET /auth/me answers (None: it
    cannot be asked); `asked` records each question (True: a fresh one).
    """

    def __init__(self, user_name: str = "alice", policy: Rights | None = EVERYTHING) -> None:
        self.user_name = user_name
        self.session = "s1"
        self.online = True
        self.policy = policy
        self.asked: list[bool] = []
        self.sent: list[tuple[str, str]] = []
        self.subscribed: list[tuple[str, dict[str, int]]] = []
        self.unsubscribed: list[str] = []
        self._events_in, self._events = trio.open_memory_channel[Event | Exception](100)
        self._changed = trio.Event()
        self._gave_up = False
        self._ids = iter(range(1, 1_000_000))
        self._events_in.send_nowait(Online(self.session, first=True))

    async def subscribe(self, destination: str, **options: int) -> None:
        self.subscribed.append((destination, options))

    async def unsubscribe(self, destination: str) -> None:
        self.unsubscribed.append(destination)

    async def rights(self, *, fresh: bool = False) -> Rights:
        self.asked.append(fresh)
        if self.policy is None:
            raise ConnectionLost("not connected: cannot ask the server what we may do")
        return self.policy

    async def send(self, destination: str, body: str, *, queued_at: float) -> None:
        while not self.online:
            if self._gave_up:
                raise NotDelivered("not connected for 30 s; it was not sent", maybe_delivered=False)
            await self._changed.wait()
        self.sent.append((destination, body))
        if destination.startswith("/user/"):
            to = destination.removeprefix("/user/")
            self.deliver(f"/user/{self.user_name}", self.user_name, body, to=to)
        else:
            self.deliver(destination, self.user_name, body)

    def __aiter__(self) -> FakeLink:
        return self

    async def __anext__(self) -> Event:
        event = await self._events.receive()
        if isinstance(event, Exception):
            raise event
        return event

    # the test's side

    def deliver(
        self,
        destination: str,
        sender: str,
        text: str,
        *,
        timestamp: int = TODAY_9AM,
        history: bool = False,
        to: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        message_id = f"m{next(self._ids)}"
        self._events_in.send_nowait(
            Message(
                destination,
                "sub-1",
                message_id,
                sender,
                timestamp,
                text.encode(),
                headers,
                history=history,
                to=to,
            )
        )

    def emit(self, event: Event) -> None:
        """What the session tells the chat (a `Refused` room, ...)."""
        self._events_in.send_nowait(event)

    def go_offline(self) -> None:
        self.online = False
        self._events_in.send_nowait(Reconnecting(3, 1.2, "connection refused"))

    def go_online(self) -> None:
        self.online = True
        self._events_in.send_nowait(Online("s2", first=False))
        self._signal()

    def give_up(self) -> None:
        """What the session does after its send timeout: the waiting sends fail."""
        self._gave_up = True
        self._signal()

    def lose(self) -> None:
        self._events_in.send_nowait(ConnectionLost("the server refused our token"))

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


# ---------------------------------------------------------------- running the chat


@asynccontextmanager
async def screen_on(
    terminal: Terminal, history: Path, *, colour: bool | None = None
) -> AsyncIterator[tuple[Screen, PipeInput]]:
    with create_pipe_input() as keys:
        async with open_screen(
            history, pt_input=keys, pt_output=terminal.output, colour=colour
        ) as screen:
            yield screen, keys


@dataclass
class Chat:
    """A chat running on a screen: its keyboard, and whether it ended."""

    keys: PipeInput
    screen: Screen
    terminal: Terminal
    ended: trio.Event

    def resize(self, columns: int, rows: int) -> None:
        """As a terminal window does: the new size, then SIGWINCH."""
        self.terminal.resize(columns, rows)
        self.screen.resized()


@asynccontextmanager
async def chatting(
    link: FakeLink, terminal: Terminal, history: Path, *, colour: bool | None = None
) -> AsyncIterator[Chat]:
    """The chat in lobby on `terminal`, until the block ends."""
    async with screen_on(terminal, history, colour=colour) as (screen, keys):
        chat = Chat(keys, screen, terminal, trio.Event())

        async def run() -> None:
            await ChatSession(link, screen).run("lobby")
            chat.ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await terminal.has("[lobby] >")
            yield chat
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- (a) typing, messages, resize


def layout(rows: int, conversation: list[str], typing: list[str], status: str) -> list[str]:
    """A whole screen: the conversation on top, the typed line and the status at the bottom."""
    blank = rows - len(conversation) - len(typing) - 1
    assert blank >= 0
    return [*conversation, *[""] * blank, *typing, status]


async def test_a_message_while_a_long_line_is_typed_then_resizes(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(40, 10)
    typed = "a long line " * 8
    welcome = "* connected as alice (session s1); /help lists commands"
    message = "09:08:33 [lobby] bob: hi alice"
    async with chatting(link, terminal, tmp_path / "h") as chat:
        chat.keys.send_text(typed)
        prompt = "[lobby] > " + typed
        await terminal.shows(
            layout(
                10,
                [*wrapped(welcome, 40), "* joined lobby"],
                wrapped(prompt, 40),
                "connected as alice",
            )
        )
        link.deliver("/topic/lobby", "bob", "hi alice")
        await terminal.shows(
            layout(
                10,
                [*wrapped(welcome, 40), "* joined lobby", message],
                wrapped(prompt, 40),
                "connected as alice",
            )
        )
        chat.resize(60, 12)
        await terminal.shows(
            layout(
                12,
                [welcome, "* joined lobby", message],
                wrapped(prompt, 60),
                "connected as alice",
            )
        )
        chat.resize(30, 8)  # narrower: the conversation keeps its newest rows in view
        await terminal.shows(
            layout(
                8,
                ["* joined lobby", message],
                wrapped(prompt, 30),
                "connected as alice",
            )
        )
        chat.keys.send_text("!\r")  # the typed line was intact all along
        await terminal.has("09:08:33 [lobby] alice: a long")
    assert link.sent == [("/topic/lobby", typed + "!")]


# ---------------------------------------------------------------- (b) offline typing never blocks


WELCOME = "* connected as alice (session s1); /help lists commands"
OFFLINE = "reconnecting\N{HORIZONTAL ELLIPSIS} attempt 3, next try in 1.2 s: connection refused"
PENDING = "\N{HORIZONTAL ELLIPSIS} pending: "


async def test_lines_typed_offline_are_pending_then_sent_in_order(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(70, 12)
    async with chatting(link, terminal, tmp_path / "h") as chat:
        link.go_offline()
        await terminal.has(OFFLINE)
        chat.keys.send_text("one\rtwo\r/rooms\r")  # the commands still answer meanwhile
        waiting = [
            WELCOME,
            "* joined lobby",
            PENDING + "one",
            PENDING + "two",
            "* rooms: lobby (current)",
        ]
        await terminal.shows(layout(12, waiting, ["[lobby] >"], OFFLINE))
        assert link.sent == []
        pending = terminal.char(*terminal.find(PENDING + "one"))
        assert (pending.fg, pending.italics) == ("brightblack", True)
        link.go_online()
        sent = ["09:08:33 [lobby] alice: one", "09:08:33 [lobby] alice: two"]
        await terminal.shows(layout(12, [*waiting, *sent], ["[lobby] >"], "connected as alice"))
    assert link.sent == [("/topic/lobby", "one"), ("/topic/lobby", "two")]


async def test_a_line_the_link_never_came_back_for_is_reported(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(70, 10)
    async with chatting(link, terminal, tmp_path / "h") as chat:
        link.go_offline()
        chat.keys.send_text("lost\r")
        await terminal.has(PENDING + "lost")
        link.give_up()
        report = "* not delivered: 'lost': not connected for 30 s; it was not sent"
        await terminal.has(report)
        assert terminal.char(*terminal.find(report)).fg == "red"
        chat.keys.send_text("/rooms\r")
        await terminal.has("* rooms: lobby (current)")
    assert link.sent == []


async def test_quit_waits_for_pending_lines(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(70, 10)
    async with chatting(link, terminal, tmp_path / "h") as chat:
        link.go_offline()
        chat.keys.send_text("later\r/quit\r")
        await terminal.has("* leaving once 1 pending line(s) are sent; Ctrl-C leaves now")
        assert not chat.ended.is_set()
        link.go_online()
        with trio.fail_after(FAST):
            await chat.ended.wait()
    assert link.sent == [("/topic/lobby", "later")]


async def test_ctrl_c_leaves_at_once_and_names_what_was_not_sent(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(70, 10)
    async with chatting(link, terminal, tmp_path / "h") as chat:
        link.go_offline()
        chat.keys.send_text("gone\ralso\r")
        await terminal.has(PENDING + "also")
        chat.keys.send_text("\x03")
        with trio.fail_after(FAST):
            await chat.ended.wait()
        await terminal.has("* left before the server confirmed 'gone': it may not have arrived")
        await terminal.has("* not sent: 'also'")
    assert link.sent == []


async def test_ctrl_d_leaves(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(70, 10)
    async with chatting(link, terminal, tmp_path / "h") as chat:
        chat.keys.send_text("half\x15\x04")  # Ctrl-U empties the line; Ctrl-D on it leaves
        with trio.fail_after(FAST):
            await chat.ended.wait()
    assert link.sent == []


async def test_a_lost_session_ends_the_chat_and_restores_the_terminal(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(60, 8)
    with pytest.raises(ConnectionLost, match="refused our token"):
        async with screen_on(terminal, tmp_path / "h") as (screen, _):
            link.lose()
            await ChatSession(link, screen).run("lobby")
    written = terminal.written.getvalue()
    assert written.rindex("\x1b[?1049l") > written.rindex("\x1b[?1049h")  # main screen back
    assert "* joined lobby" in terminal.lines()  # the last screenful is left behind
    assert threading.active_count() == 1 or not any(
        thread.name == "chat-screen" for thread in threading.enumerate()
    )


# ---------------------------------------------------------------- (c) your own message, once


async def test_own_message_is_shown_once_and_marked(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(60, 10)
    async with chatting(link, terminal, tmp_path / "h") as chat:
        chat.keys.send_text("hello\r")
        mine = "09:08:33 [lobby] alice: hello"
        await terminal.shows(
            layout(
                10,
                [WELCOME, "* joined lobby", mine],
                ["[lobby] >"],
                "connected as alice",
            )
        )
        link.deliver("/topic/lobby", "bob", "hi")
        await terminal.has("09:08:33 [lobby] bob: hi")
        row, column = terminal.find("alice: hello")
        me = terminal.char(row, column)
        bob = terminal.char(*terminal.find("bob: hi"))
        system = terminal.char(*terminal.find("* joined"))
        assert (me.fg, me.bold) == ("green", True)
        assert (bob.fg, bob.bold) == ("brown", True)  # pyte's name for ANSI yellow
        assert system.fg == "blue"
        assert terminal.char(row, column + len("alice: ")).fg == "default"


# ---------------------------------------------------------------- (d) no colour


def colours(written: str) -> set[int]:
    """The colour parameters of every SGR sequence written."""
    return {
        int(parameter)
        for sequence in SGR.findall(written)
        for parameter in sequence.split(";")
        if parameter and int(parameter) in COLOUR_PARAMETERS
    }


async def show_every_kind_of_line(link: FakeLink, chat: Chat) -> None:
    link.deliver("/topic/lobby", "bob", "from history", history=True)
    link.deliver("/topic/lobby", "bob", "live")
    chat.keys.send_text("mine\r/frob\r")
    await chat.terminal.has("alice: mine")
    await chat.terminal.has("* unknown command /frob")
    link.go_offline()
    chat.keys.send_text("waiting\r")
    await chat.terminal.has(PENDING + "waiting")
    await chat.terminal.has(OFFLINE)


@pytest.mark.parametrize("no_color", ["1", None])
async def test_no_color_means_no_colour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_color: str | None
) -> None:
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    link, terminal = FakeLink(), Terminal(70, 12)
    async with screen_on(terminal, tmp_path / "h") as (screen, keys):
        chat = Chat(keys, screen, terminal, trio.Event())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ChatSession(link, screen).run, "lobby")
            await show_every_kind_of_line(link, chat)
            nursery.cancel_scope.cancel()
    found = colours(terminal.written.getvalue())
    if no_color:
        assert found == set()
    else:  # the check can fail: the same lines in colour
        assert {31, 32, 33, 34, 36} <= found


def test_an_empty_no_color_is_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from chat.client.screen import wants_colour

    monkeypatch.setenv("NO_COLOR", "")
    assert wants_colour()
    monkeypatch.setenv("NO_COLOR", "yes")
    assert not wants_colour()


async def test_pipes_get_plain_lines_without_escape_codes() -> None:
    link = FakeLink()
    link.deliver("/topic/lobby", "bob", "from history", history=True)
    link.deliver("/topic/lobby", "bob", "ring\x07 the bell")
    read_end, write_end = os.pipe()
    os.write(write_end, b"hello\n/rooms\n")
    os.close(write_end)
    out = io.StringIO()
    try:
        with trio.fail_after(FAST):
            await ChatSession(link, PlainConsole(out, read_end)).run("lobby")
    finally:
        os.close(read_end)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert text.splitlines()[:2] == [WELCOME, "* joined lobby"]
    assert "* rooms: lobby (current)" in text.splitlines()
    assert link.sent == [("/topic/lobby", "hello")]


# ---------------------------------------------------------------- (e) history across runs


def test_history_file_lives_beside_the_refresh_token() -> None:
    assert history_file(Path("certs/alice.refresh")) == Path("certs/alice.history")
    assert history_file(Path("tokens/alice")) == Path("tokens/alice.history")
    assert history_file(Path("odd.history")) == Path("odd.history.history")


async def test_history_is_private_and_recalled_in_the_next_run(tmp_path: Path) -> None:
    path = history_file(tmp_path / "alice.refresh")
    async with screen_on(Terminal(40, 6), path) as (screen, keys):
        keys.send_text("first line\r")
        with trio.fail_after(FAST):
            assert await screen.read_line("> ") == "first line"
    assert stat.S_IMODE(path.stat().st_mode) == HISTORY_FILE_MODE
    terminal = Terminal(40, 6)
    async with screen_on(terminal, path) as (screen, keys):
        keys.send_text("\x1b[A")  # Up: the line from the run before
        await terminal.until(lambda lines: "first line" in lines)
        keys.send_text("\r")
        with trio.fail_after(FAST):
            assert await screen.read_line("> ") == "first line"


async def test_only_the_newest_history_entries_are_loaded(tmp_path: Path) -> None:
    path = tmp_path / "alice.history"
    path.write_text("".join(f"\n# then\n+line {i}\n" for i in range(MAX_HISTORY_ENTRIES + 5)))
    terminal = Terminal(40, 6)
    async with screen_on(terminal, path) as (screen, keys):
        keys.send_text("\x1b[A")
        await terminal.until(lambda lines: f"line {MAX_HISTORY_ENTRIES + 4}" in lines)


async def test_an_unusable_history_file_degrades_to_memory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "alice.history"
    terminal = Terminal(250, 6)
    async with screen_on(terminal, path) as (screen, keys):
        await terminal.has(f"* typed lines are not kept: cannot open {path}: No such file")
        keys.send_text("still works\r")
        with trio.fail_after(FAST):
            assert await screen.read_line("> ") == "still works"
        keys.send_text("\x1b[A")  # recalled within the run
        await terminal.until(lambda lines: "> still works" in lines)
    assert not path.parent.exists()


# ---------------------------------------------------------------- (f) history on /join


def styles(terminal: Terminal, row: int) -> set[tuple[str, bool]]:
    """The (colour, italics) of the characters shown in `row`."""
    return {
        (char.fg, char.italics) for char in terminal.screen.buffer[row].values() if char.data != " "
    }


async def test_join_shows_the_room_history_marked_then_live_messages(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(60, 12)
    async with chatting(link, terminal, tmp_path / "h") as chat:
        chat.keys.send_text("/join dev\r")
        await terminal.has("* joined dev")
        link.deliver("/topic/dev", "bob", "said before", history=True)
        link.deliver("/topic/dev", "alice", "mine before", history=True)
        link.deliver("/topic/dev", "bob", "said now")
        lines = await terminal.has("bob: said now")
        assert lines[2:6] == [
            "* joined dev",
            "09:08:33 [dev] bob: said before",
            "09:08:33 [dev] alice: mine before",
            "09:08:33 [dev] bob: said now",
        ]
        for row in (3, 4):
            assert styles(terminal, row) == {("brightblack", True)}, row
        assert styles(terminal, 5) == {("default", False), ("cyan", False), ("brown", False)}
        chat.keys.send_text("/join dev.*\r")
        await terminal.has("* joined dev.*")
    assert link.subscribed == [
        ("/user/alice", {"last": 20}),
        ("/topic/lobby", {"last": 20}),
        ("/presence/lobby", {}),
        ("/topic/dev", {"last": 20}),
        ("/presence/dev", {}),
        ("/topic/dev.*", {}),
    ]


# ---------------------------------------------------------------- (g) dates


def test_clock_says_the_day_unless_it_is_today() -> None:
    old = int(datetime(2026, 11, 30, 9, 8, 41).timestamp() * 1000)
    assert clock(old, date(2026, 12, 1)) == "2026-11-30 09:08"
    assert clock(old, date(2026, 11, 30)) == "09:08:41"


async def test_old_messages_show_their_date(tmp_path: Path) -> None:
    link, terminal = FakeLink(), Terminal(60, 10)
    old = int(datetime(2020, 11, 30, 9, 8, 41).timestamp() * 1000)
    async with chatting(link, terminal, tmp_path / "h"):
        link.deliver("/topic/lobby", "bob", "long ago", timestamp=old, history=True)
        link.deliver("/topic/lobby", "bob", "today")
        lines = await terminal.has("bob: today")
    assert lines[2:4] == ["2020-11-30 09:08 [lobby] bob: long ago", "09:08:33 [lobby] bob: today"]
