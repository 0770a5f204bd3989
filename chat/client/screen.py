"""The chat on a terminal: a full-screen prompt_toolkit application.

Why full screen: the conversation, the line being typed and the status line are all drawn
by prompt_toolkit from its own model, so a message arriving mid-line, a long wrapped line
or a resize can never leave debris. Printing above a prompt instead (`patch_stdout`) works
until the terminal is resized: terminals that reflow their lines (tmux, VTE, iTerm2) move
the prompt where prompt_toolkit no longer finds it, and half-erased copies stay behind.
The price is our own scrollback (the newest `MAX_LOG_ROWS` rows, PageUp/PageDown); the
last screenful is printed to the terminal on leaving, so the end of the chat stays there.

Why a thread: prompt_toolkit runs on asyncio, the client on trio. trio's guest mode could
run trio inside asyncio's loop, but asyncio would then own the main thread, the signals and
the run's lifetime, and the chat would start differently from --send and --listen. Instead
the application gets its own asyncio loop in a dedicated thread, and the two sides only
pass messages, never waiting on each other: trio to the screen through
`loop.call_soon_threadsafe` (lines, the status, the prompt), the screen to trio through the
trio token's `run_sync_soon` (typed lines, into a memory channel). A slow network never
freezes typing; a slow terminal never stalls the session. Signals stay with trio in the
main thread (SIGWINCH is passed on); in raw mode Ctrl-C and Ctrl-D are keys, sent as `End`s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from itertools import islice
from pathlib import Path

import trio
from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.data_structures import Point
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import FormattedText, StyleAndTextTuples
from prompt_toolkit.formatted_text.utils import split_lines
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import HSplit, Layout, Window
from prompt_toolkit.layout.controls import (
    BufferControl,
    FormattedTextControl,
    UIContent,
    UIControl,
)
from prompt_toolkit.layout.dimension import Dimension
from prompt_toolkit.layout.processors import BeforeInput
from prompt_toolkit.output import ColorDepth, Output
from prompt_toolkit.shortcuts import print_formatted_text
from prompt_toolkit.styles import Style
from prompt_toolkit.widgets import SearchToolbar

from chat.client.display import Styled, error_line, link_status
from chat.client.resilient import Online, Reconnecting
from chat.client.terminal import End, Typed

HISTORY_FILE_MODE = 0o600  # what you typed is as private as your token
MAX_HISTORY_ENTRIES = 1000  # recalled with the arrow keys; older ones stay in the file unread
MAX_LOG_ROWS = 5000  # rows of conversation kept on screen to page back through
MAX_INPUT_ROWS = 8  # a longer typed line scrolls inside its box; the conversation stays seen
MAX_TYPED_AHEAD = 64  # lines typed while the chat was busy with a command, not yet taken
UI_EXIT_TIMEOUT = 5.0  # seconds for the screen to restore the terminal and stop, on leaving

STYLE = Style.from_dict(
    {
        "time": "",
        "room": "ansicyan",
        "own": "ansigreen bold",
        "sender": "ansiyellow bold",
        "system": "ansiblue",
        "error": "ansired bold",
        "pending": "ansibrightblack italic",
        "toolbar": "reverse",
        "offline": "ansired",  # under the toolbar's reverse video: a red bar
        "history": "ansibrightblack italic",  # named last in a line's styles: its colour wins
    }
)


def wants_colour() -> bool:
    """Colour unless NO_COLOR is set to something (https://no-color.org)."""
    return not os.environ.get("NO_COLOR")


# ---------------------------------------------------------------- typed-line history


class _KeptHistory(FileHistory):
    """FileHistory that loads only the newest entries and survives a file gone bad."""

    def load_history_strings(self) -> Iterable[str]:
        try:
            return list(islice(super().load_history_strings(), MAX_HISTORY_ENTRIES))
        except OSError:
            return []

    def store_string(self, string: str) -> None:
        with suppress(OSError):  # a full disk costs the recall of a line, not the chat
            super().store_string(string)


def open_history(path: Path) -> tuple[History, str | None]:
    """The history kept in `path` (created owner-only), or one in memory and why."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, HISTORY_FILE_MODE
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return InMemoryHistory(), f"typed lines are not kept: cannot open {path}: {reason}"
    os.close(fd)
    return _KeptHistory(str(path)), None


# ---------------------------------------------------------------- the conversation pane


class _Log(UIControl):
    """The conversation: the newest rows, followed to the end unless the user paged back."""

    def __init__(self) -> None:
        self.rows: deque[StyleAndTextTuples] = deque(maxlen=MAX_LOG_ROWS)
        self.back = 0  # rows scrolled back from the newest

    def add(self, line: Styled) -> None:
        self.rows.extend(split_lines(list(line)))  # a multi-line message is several rows

    def page(self, rows: int) -> None:
        """Scroll `rows` back (negative: forward), within the conversation."""
        self.back = max(0, min(self.back + rows, len(self.rows) - 1))

    def create_content(self, width: int, height: int | None) -> UIContent:
        rows = list(self.rows)
        return UIContent(
            get_line=lambda i: rows[i] if i < len(rows) else [],
            line_count=max(len(rows), 1),
            cursor_position=Point(0, max(len(rows) - 1 - self.back, 0)),  # kept in view
            show_cursor=False,
        )

    def is_focusable(self) -> bool:
        return False


# ---------------------------------------------------------------- the screen


class Screen:
    """The application in its own thread; the public methods are called from trio."""

    def __init__(
        self, history: History, pt_input: Input | None, pt_output: Output | None, colour: bool
    ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._typed_in, self._typed = trio.open_memory_channel[Typed](MAX_TYPED_AHEAD)
        self._ready = trio.Event()
        self._queued: deque[Styled] = deque()  # to show; appended by trio, taken by the UI
        self._status: Styled = ()
        self._prompt = ""
        self._crash: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = _Log()
        self._app = self._application(history, pt_input, pt_output, colour)
        self._thread = threading.Thread(target=self._main, name="chat-screen", daemon=True)

    # ------------------------------------------------------------ trio's side

    async def start(self) -> None:
        self._thread.start()
        await self._ready.wait()

    async def stop(self) -> None:
        """Leave the application, restoring the terminal; re-raise a crash of the screen."""
        self._call(self._exit)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join, UI_EXIT_TIMEOUT)
        if self._crash is not None:
            raise self._crash

    def show(self, line: Styled) -> None:
        self._queued.append(line)
        self._call(self._take_queued)

    def link_changed(self, event: Online | Reconnecting, me: str) -> None:
        self._status = link_status(event, me)
        self._call(self._app.invalidate)

    async def read_line(self, prompt: str) -> Typed:
        self.prompt_changed(prompt)
        return await self._typed.receive()

    def prompt_changed(self, prompt: str) -> None:
        if prompt != self._prompt:
            self._prompt = prompt
            self._call(self._app.invalidate)

    def resized(self) -> None:
        """The terminal changed size: draw everything anew at the new size."""
        self._call(self._redraw)

    def _call(self, function: Callable[[], object]) -> None:
        """Run `function` on the screen's loop, soon; nothing once the screen is gone."""
        loop = self._loop
        if loop is not None:
            with suppress(RuntimeError):  # the loop is closed: the screen has stopped
                loop.call_soon_threadsafe(function)

    def _take(self, typed: Typed) -> None:
        """(In trio) a line from the screen."""
        try:
            self._typed_in.send_nowait(typed)
        except trio.WouldBlock:
            self.show(error_line("typing faster than the chat takes lines: one was dropped"))

    # ------------------------------------------------------------ the screen's thread

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # a bug: end the chat, re-raised by stop()
            self._crash = exc
            self._to_trio(self._take, End.INTERRUPT)
            self._to_trio(self._ready.set)

    def _to_trio(self, function: Callable[..., object], *args: object) -> None:
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(function, *args)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        with suppress(EOFError):  # the terminal went away: the chat ends as with Ctrl-D
            await self._app.run_async(pre_run=lambda: self._to_trio(self._ready.set))
        self._to_trio(self._take, End.EOF)  # in case the input ended it, not trio
        self._take_queued()
        self._print_tail()

    def _take_queued(self) -> None:
        while self._queued:
            self._log.add(self._queued.popleft())
        self._app.invalidate()

    def _print_tail(self) -> None:
        """The last screenful of the conversation, left on the terminal once we are gone."""
        rows = list(self._log.rows)[-max(self._app.output.get_size().rows - 1, 1) :]
        text: StyleAndTextTuples = []
        for row in rows:
            text += [*row, ("", "\n")]
        print_formatted_text(
            FormattedText(text),
            end="",
            style=STYLE,
            output=self._app.output,
            color_depth=self._app.color_depth,
            include_default_pygments_style=False,
        )

    def _exit(self) -> None:
        future = self._app.future
        if future is not None and not future.done():
            self._app.exit()

    def _redraw(self) -> None:
        """What prompt_toolkit does on SIGWINCH in the main thread (in ours it only polls)."""
        if self._app.is_running:
            self._app.renderer.erase(leave_alternate_screen=False)
            self._app.invalidate()

    # ------------------------------------------------------------ the application

    def _application(
        self, history: History, pt_input: Input | None, pt_output: Output | None, colour: bool
    ) -> Application[None]:
        buffer = Buffer(history=history, multiline=False, accept_handler=self._accept)
        search = SearchToolbar()
        typing = Window(
            BufferControl(
                buffer,
                input_processors=[BeforeInput(self._message)],
                search_buffer_control=search.control,
                preview_search=True,
            ),
            height=Dimension(min=1, max=MAX_INPUT_ROWS),
            wrap_lines=True,
            dont_extend_height=True,
        )
        conversation = Window(self._log, wrap_lines=True)
        toolbar = Window(FormattedTextControl(self._toolbar), height=1, style="class:toolbar")
        return Application(
            layout=Layout(HSplit([conversation, typing, search, toolbar]), focused_element=typing),
            key_bindings=self._keys(buffer, conversation),
            style=STYLE,
            full_screen=True,
            input=pt_input,
            output=pt_output,
            include_default_pygments_style=False,
            color_depth=None if colour else ColorDepth.DEPTH_1_BIT,
        )

    def _keys(self, buffer: Buffer, conversation: Window) -> KeyBindings:
        keys = KeyBindings()
        empty = Condition(lambda: not buffer.text)

        def page() -> int:
            info = conversation.render_info
            return max((info.window_height if info else 1) - 1, 1)

        @keys.add("c-c")
        def _interrupt(event: KeyPressEvent) -> None:
            self._to_trio(self._take, End.INTERRUPT)

        @keys.add("c-d", filter=empty)
        def _end(event: KeyPressEvent) -> None:
            self._to_trio(self._take, End.EOF)

        @keys.add("pageup")
        def _back(event: KeyPressEvent) -> None:
            self._log.page(page())

        @keys.add("pagedown")
        def _forward(event: KeyPressEvent) -> None:
            self._log.page(-page())

        return keys

    def _accept(self, buffer: Buffer) -> bool:
        self._log.back = 0  # what you say is followed by what comes next
        self._to_trio(self._take, buffer.text)
        buffer.reset(append_to_history=True)
        buffer.load_history_if_not_yet_loaded()  # else Up finds it only after the next redraw
        return True  # the line is cleared already

    def _message(self) -> FormattedText:
        return FormattedText([("class:prompt", self._prompt)])

    def _toolbar(self) -> FormattedText:
        back = self._log.back
        paged = [("", f" (paged back {back} rows: PageDown)")] if back else []
        return FormattedText([*self._status, *paged])


@contextmanager
def _terminal_restored() -> Iterator[None]:
    """The terminal's settings as found, whatever happens to the screen's thread."""
    import termios

    saved = termios.tcgetattr(sys.stdin.fileno())
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


@contextmanager
def _following_resizes(screen: Screen) -> Iterator[None]:
    """SIGWINCH (delivered to the main thread, trio's) redraws the screen at once."""
    previous = signal.signal(signal.SIGWINCH, lambda *_: screen.resized())
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


@asynccontextmanager
async def open_screen(
    history: Path,
    *,
    pt_input: Input | None = None,
    pt_output: Output | None = None,
    colour: bool | None = None,
) -> AsyncIterator[Screen]:
    """The chat's screen; typed lines kept in `history`. Default input and output: the
    process's terminal. Stopped, with the terminal restored, on the way out."""
    kept, notice = open_history(history)
    with ExitStack() as terminal:
        if pt_input is None:
            terminal.enter_context(_terminal_restored())
        screen = Screen(kept, pt_input, pt_output, wants_colour() if colour is None else colour)
        await screen.start()
        try:
            if notice is not None:
                screen.show(error_line(notice))
            if pt_output is None:
                terminal.enter_context(_following_resizes(screen))
            yield screen
        finally:
            await screen.stop()
