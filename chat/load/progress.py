"""The progress line chat-load keeps on a terminal while it runs.

One line on stderr, rewritten in place about once a second (carriage return, then the
ANSI "erase line" sequence) and erased before the report is printed, so the report, and
whatever reads stdout, never see it. The CLI shows it only when stderr is a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TextIO

ERASE_LINE = "\r\x1b[2K"  # back to column 0, then ECMA-48 EL 2: erase the whole line
INTERVAL = 1.0  # seconds between refreshes: often enough to watch, rare enough to cost nothing


@dataclass(frozen=True, slots=True)
class Sample:
    """The run's counters at one moment."""

    at: float  # trio clock, seconds
    phase: str  # connecting, warm-up, measuring, draining
    connected: int  # links up right now
    requested: int
    sent: int  # messages sent so far, warm-up included
    delivered: int  # deliveries so far


class Progress(Protocol):
    """Where a run reports its samples (the CLI's line on a terminal, or nothing)."""

    def show(self, sample: Sample) -> None: ...

    def clear(self) -> None: ...


def render(previous: Sample | None, current: Sample) -> str:
    """The line for `current`, with rates since `previous` (none yet: a dash)."""
    elapsed = current.at - previous.at if previous is not None else 0.0
    sent = delivered = "-"
    if previous is not None and elapsed > 0:
        sent = f"{(current.sent - previous.sent) / elapsed:,.0f}"
        delivered = f"{(current.delivered - previous.delivered) / elapsed:,.0f}"
    return (
        f"{ERASE_LINE}chat-load: {current.phase}  connected {current.connected:,}/"
        f"{current.requested:,}  sent {sent}/s  delivered {delivered}/s"
    )


class ProgressLine:
    """Samples as one line of `stream`, rewritten in place."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last: Sample | None = None

    def show(self, sample: Sample) -> None:
        self._stream.write(render(self._last, sample))
        self._stream.flush()
        self._last = sample

    def clear(self) -> None:
        """Leave the line empty (before the report), if anything was shown."""
        if self._last is not None:
            self._stream.write(ERASE_LINE)
            self._stream.flush()
            self._last = None
