"""What the chat shows: rooms by name, and every line as styled text.

A line is a tuple of (style class, text) fragments, prompt_toolkit's formatted-text shape,
so the terminal screen colours it and a pipe prints only its text: the wording is decided
once, here, for both. Nothing in this module does I/O or imports prompt_toolkit.
"""

from __future__ import annotations

import re
from datetime import date, datetime

from chat.client.messages import Message
from chat.client.resilient import Event, Online, Reconnecting, Recovered, Refused
from chat.protocol.topics import ANY, ONE, TOPIC_PREFIX, parse_destination

Styled = tuple[tuple[str, str], ...]  # (prompt_toolkit style class, text) fragments

CONVERSATION = "@"  # `@bob`: the conversation with bob (direct messages, PROTOCOL.md §10)
CONTINUATION = "\n    "  # later lines of a multi-line message are indented under the first
ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"
TODAY_CLOCK = "%H:%M:%S"  # a message from today: the time is enough
OTHER_DAY_CLOCK = "%Y-%m-%d %H:%M"  # an older one (history, a long absence): say the day
# C0 and C1 control characters (but tab and newline): a message must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------- rooms


def room_destination(room: str, *, wildcards: bool) -> str:
    """`dev.backend` -> `/topic/dev.backend`, checked with the server's own rules."""
    destination = room if room.startswith(TOPIC_PREFIX) else TOPIC_PREFIX + room
    parse_destination(destination, wildcards=wildcards)
    return destination


def room_of(destination: str) -> str:
    return destination.removeprefix(TOPIC_PREFIX)


def is_wildcard(room: str) -> bool:
    return any(segment in (ONE, ANY) for segment in room.split("."))


def where(message: Message, me: str) -> str:
    """What a message is shown in: its room, or `@NAME` for a conversation with NAME."""
    if message.direct:
        return CONVERSATION + message.other_party(me)
    return room_of(message.destination)


# ---------------------------------------------------------------- text


def printable(text: str) -> str:
    """`text` with control characters replaced, lines after the first indented."""
    lines = [_CONTROL.sub("\N{REPLACEMENT CHARACTER}", line) for line in text.splitlines()]
    return CONTINUATION.join(lines)


def plain(line: Styled) -> str:
    """The text of a styled line, for a pipe."""
    return "".join(text for _, text in line)


def clock(timestamp_ms: int, today: date) -> str:
    """The server's timestamp in local time: `HH:MM:SS` today, with the date otherwise."""
    moment = datetime.fromtimestamp(timestamp_ms / 1000)
    return moment.strftime(TODAY_CLOCK if moment.date() == today else OTHER_DAY_CLOCK)


def message_line(message: Message, me: str, today: date | None = None) -> Styled:
    """`HH:MM:SS [room] sender: text` (`[@NAME]` for a conversation with NAME): our own
    name and replayed history styled apart."""
    today = today or date.today()
    sender = "class:own" if message.sender == me else "class:sender"
    line: Styled = (
        ("class:time", clock(message.timestamp, today)),
        ("", " "),
        ("class:room", f"[{printable(where(message, me))}]"),
        ("", " "),
        (sender, printable(message.sender)),
        ("", f": {printable(message.text)}"),
    )
    if message.history:
        return tuple((f"{style} class:history".lstrip(), text) for style, text in line)
    return line


def format_message(message: Message, me: str) -> str:
    """`HH:MM:SS [room] sender: text` as plain text (--listen); `me` names conversations."""
    return plain(message_line(message, me))


def system_line(text: str) -> Styled:
    """A status line (joined, left, ...): set apart from chat lines by a `*`."""
    return (("class:system", f"* {text}"),)


def error_line(text: str) -> Styled:
    """Something the user asked for that did not happen."""
    return (("class:error", f"* {text}"),)


def pending_line(text: str) -> Styled:
    """A line typed while offline, waiting for the link to be sent."""
    return (("class:pending", f"{ELLIPSIS} pending: {printable(text)}"),)


def help_line(text: str) -> Styled:
    return (("", text),)


# ---------------------------------------------------------------- the link's state


def describe(event: Event) -> str | None:
    """The status line for a session event worth a line (without the `* `), else None:
    what pipes and --listen print, one line per event."""
    if isinstance(event, Reconnecting):
        return (
            f"reconnecting{ELLIPSIS} (attempt {event.attempt}, next try in "
            f"{event.delay:.1f} s): {printable(event.reason)}"
        )
    if isinstance(event, Online) and not event.first:
        return "back online"
    if isinstance(event, Recovered) and not event.ok:
        return recovery_gap(event)
    if isinstance(event, Refused):
        return f"{printable(room_of(event.destination))}: {printable(event.reason)}"
    return None


def recovery_gap(event: Recovered) -> str:
    room = printable(room_of(event.destination))
    return f"{room}: messages sent while you were away may be missing"


def link_status(event: Online | Reconnecting, me: str) -> Styled:
    """The one status line a terminal keeps updated (its bottom toolbar)."""
    if isinstance(event, Online):
        return (("class:online", f"connected as {printable(me)}"),)
    return (
        (
            "class:offline",
            f"reconnecting{ELLIPSIS} attempt {event.attempt}, next try in {event.delay:.1f} s: "
            f"{printable(event.reason)}",
        ),
    )
