"""STOMP 1.2 frame codec, sans-IO: bytes in, frames out; frames in, bytes out.

How parsing works: `FrameParser` keeps one bytearray of unconsumed input and a
cursor saying how far it has already looked. Each step skips heart-beat EOLs,
finds the blank line that ends the header block (`\\n\\n` or `\\n\\r\\n`), parses
command and headers once, then waits for the body: exactly `content-length`
bytes followed by NUL, or everything up to the first NUL. Searches resume where
the previous one stopped, so a frame arriving in many small pieces is scanned
once; consumed bytes are dropped once per `feed()`. Every limit is checked
against what is buffered, so a peer cannot make us hold more than one frame's
worth. Errors are sticky: after one, the parser never guesses where the next
frame starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chat.protocol.errors import (
    FrameTooLarge,
    MalformedFrame,
    MissingHeader,
    StompProtocolError,
    UnknownCommand,
)

# STOMP 1.2 "Client Frames" and "Server Frames"
CLIENT_COMMANDS: frozenset[str] = frozenset(
    {"CONNECT", "STOMP", "DISCONNECT", "SEND", "SUBSCRIBE", "UNSUBSCRIBE"}
    | {"ACK", "NACK", "BEGIN", "COMMIT", "ABORT"}
)
SERVER_COMMANDS: frozenset[str] = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})

# STOMP 1.2 "Value Encoding": headers of these frames are neither escaped nor unescaped
# (backward compatibility with STOMP 1.0, whose peers do not know the escapes yet).
_RAW_COMMANDS = frozenset({"CONNECT", "CONNECTED"})

MAX_FRAME_BYTES = 65536  # a chat message plus headers; bounds what one peer makes us buffer
MAX_HEADERS = 32  # the spec's frames need fewer than ten; bounds per-frame header work
_MAX_DIGITS = 18  # bigger numbers exceed every limit; bounds int() work on peer input
_QUOTED_CHARS = 40  # error messages quote at most this much of the peer's input

HEARTBEAT: bytes = b"\n"  # STOMP 1.2 "Heart-beating": one EOL

_EOLS = re.compile(rb"(?:\r?\n)+")
_ESCAPE_SEQUENCE = re.compile(r"\\(.?)", re.DOTALL)
_UNESCAPES = {"r": "\r", "n": "\n", "c": ":", "\\": "\\"}  # STOMP 1.2 "Value Encoding"
_ESCAPES = str.maketrans({char: "\\" + code for code, char in _UNESCAPES.items()})
_NEEDS_ESCAPE = re.compile(r"[\\\r\n:]")


class UnencodableHeader(ValueError):
    """A CONNECT/CONNECTED header that cannot be written: those frames have no escapes."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One STOMP frame; headers keep wire order and repeats (the first one counts)."""

    command: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header `name` (STOMP 1.2 "Repeated Header Entries")."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def require(self, name: str) -> str:
        """The value of a header this command must carry, else `MissingHeader`."""
        value = self.get(name)
        if value is None:
            raise MissingHeader(
                f"missing header '{name}'", f"a {self.command} frame needs a '{name}' header"
            )
        return value


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a peer may send in one frame."""

    max_frame_bytes: int = MAX_FRAME_BYTES  # command + headers + blank line + body
    max_headers: int = MAX_HEADERS


class FrameParser:
    """Feed bytes, get complete frames. Sticky failure: after an error every feed() raises it again.

    Frames completed earlier in the same `feed()` as an error are dropped with it: the
    connection is closing anyway.
    """

    __slots__ = (
        "_limits", "_commands", "_buf", "_scan", "_error",
        "_command", "_headers", "_body_offset", "_length",
    )  # fmt: skip

    def __init__(
        self, limits: Limits = Limits(), commands: frozenset[str] = CLIENT_COMMANDS
    ) -> None:
        self._limits = limits
        self._commands = commands
        self._buf = bytearray()
        self._scan = 0  # where the next search resumes: bytes before it hold no terminator
        self._error: StompProtocolError | None = None
        # The parsed head of the frame whose body is awaited; _command is "" between frames.
        self._command = ""
        self._headers: tuple[tuple[str, str], ...] = ()
        self._body_offset = 0  # from the frame's first byte
        self._length: int | None = None  # content-length, if given

    @property
    def limits(self) -> Limits:
        return self._limits

    def feed(self, data: bytes) -> list[Frame]:
        """Buffer `data` and return every frame it completes, in order (heart-beats skipped)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        try:
            return self._drain()
        except StompProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _drain(self) -> list[Frame]:
        buf = self._buf
        frames: list[Frame] = []
        start = 0  # first byte of the current frame (or of the heart-beats before it)
        while start < len(buf):
            if not self._command:
                start = self._skip_heartbeats(start)
                if not self._read_head(start):
                    break
            end = self._find_body_end(start)
            if end < 0:
                break
            body = bytes(buf[start + self._body_offset : end])
            frames.append(Frame(self._command, self._headers, body))
            self._command = ""
            start = self._scan = end + 1
        del buf[:start]
        self._scan = self._scan - start if self._scan > start else 0
        return frames

    def _skip_heartbeats(self, start: int) -> int:
        buf = self._buf
        if buf[start] in b"\r\n":
            match = _EOLS.match(buf, start)
            if match is not None:
                start = match.end()
            if start + 1 < len(buf) and buf[start] == 13:  # a CR that is not part of CRLF
                raise MalformedFrame("bare CR outside a CRLF line ending")
        return start

    def _read_head(self, start: int) -> bool:
        """Parse the command and headers once the blank line that ends them has arrived."""
        buf = self._buf
        scan = self._scan if self._scan > start else start
        lf = buf.find(b"\n\n", scan)
        crlf = buf.find(b"\n\r\n", scan, len(buf) if lf < 0 else lf + 1)
        end, blank = (crlf, 3) if crlf >= 0 else (lf, 2)
        if end < 0:
            self._scan = max(start, len(buf) - 2)  # a terminator may straddle the next feed
            self._check_size(len(buf) - start)  # fail now, not when the frame ends
            return False
        self._parse_head(buf[start:end], end + blank - start)
        self._scan = end + blank
        return True

    def _parse_head(self, block: bytearray, body_offset: int) -> None:
        limit = self._limits.max_frame_bytes
        if body_offset > limit:
            detail = f"its header block alone is {body_offset} bytes"
            raise FrameTooLarge(f"frame exceeds {limit} bytes", detail)
        text = _decode_head(block)
        command, *lines = _split_lines(text)
        if command not in self._commands:
            raise UnknownCommand(f"unknown command {command[:_QUOTED_CHARS]!r}")
        if len(lines) > self._limits.max_headers:
            raise FrameTooLarge(f"frame has more than {self._limits.max_headers} headers")
        escaped = "\\" in text and command not in _RAW_COMMANDS
        headers = _parse_headers(lines, escaped)
        length = _content_length(headers)
        if length is not None and body_offset + length > limit:
            raise FrameTooLarge(f"frame exceeds {limit} bytes", f"content-length is {length}")
        self._command, self._headers = command, headers
        self._body_offset, self._length = body_offset, length

    def _find_body_end(self, start: int) -> int:
        """Index of the frame's terminating NUL, or -1 while it has not arrived."""
        buf = self._buf
        if self._length is not None:
            end = start + self._body_offset + self._length
            if len(buf) <= end:
                return -1
            if buf[end] != 0:
                raise MalformedFrame(
                    f"no NUL after the {self._length} body bytes of content-length"
                )
            return end
        end = buf.find(b"\0", self._scan)
        if end < 0:
            self._scan = len(buf)
            self._check_size(len(buf) - start)  # fail now, not when the NUL arrives
            return -1
        self._check_size(end - start)
        return end

    def _check_size(self, size: int) -> None:
        if size > self._limits.max_frame_bytes:
            raise FrameTooLarge(f"frame exceeds {self._limits.max_frame_bytes} bytes")


def _decode_head(block: bytearray) -> str:
    try:
        text = block.decode()
    except UnicodeDecodeError as exc:
        raise MalformedFrame("frame header is not valid UTF-8") from exc
    if "\0" in text:
        raise MalformedFrame("NUL byte in frame header")
    return text


def _split_lines(text: str) -> list[str]:
    """The command and header lines of a header block; LF or CRLF endings (STOMP 1.2 BNF)."""
    lines = text.split("\n")
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        if any("\r" in line for line in lines):
            raise MalformedFrame("bare CR in frame header")
    return lines


def _parse_headers(lines: list[str], escaped: bool) -> tuple[tuple[str, str], ...]:
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise MalformedFrame(f"header line without ':': {line[:_QUOTED_CHARS]!r}")
        if not name:
            raise MalformedFrame(f"empty header name in {line[:_QUOTED_CHARS]!r}")
        headers.append((name, value))
    if escaped:
        return tuple([(_unescape(name), _unescape(value)) for name, value in headers])
    return tuple(headers)


def _unescape(text: str) -> str:
    return _ESCAPE_SEQUENCE.sub(_unescape_one, text) if "\\" in text else text


def _unescape_one(match: re.Match[str]) -> str:
    char = _UNESCAPES.get(match.group(1))
    if char is None:
        raise MalformedFrame(f"undefined escape '\\{match.group(1)}' in header")
    return char


def _content_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    for name, value in headers:
        if name == "content-length":
            length = _parse_uint(value)
            if length is None:
                raise MalformedFrame(f"invalid content-length {value[:_QUOTED_CHARS]!r}")
            return length
    return None


def _parse_uint(text: str) -> int | None:
    """A non-negative decimal (digits only), capped at 10**_MAX_DIGITS; None if not one."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _escape(text: str) -> str:
    if "\\" in text or ":" in text or "\n" in text or "\r" in text:
        return text.translate(_ESCAPES)
    return text


def _raw(name: str, value: str) -> str:
    """A CONNECT/CONNECTED header line; refuses what would forge extra lines or headers."""
    if ":" in name or any(c in name or c in value for c in "\r\n") or not name:
        raise UnencodableHeader(f"header {name!r} cannot be sent unescaped in CONNECT/CONNECTED")
    return f"{name}:{value}"


def encode(frame: Frame) -> bytes:
    """The wire bytes of `frame`; headers are escaped except in CONNECT and CONNECTED.

    Adds no header of its own: a body containing NUL needs a `content-length` from the caller.
    """
    headers = frame.headers
    if frame.command in _RAW_COMMANDS:
        lines = [_raw(name, value) for name, value in headers]
    elif _NEEDS_ESCAPE.search("".join([name + value for name, value in headers])) is None:
        lines = [f"{name}:{value}" for name, value in headers]  # the common case: one scan
    else:
        lines = [f"{_escape(name)}:{_escape(value)}" for name, value in headers]
    head = "\n".join([frame.command, *lines, "", ""])
    return b"".join((head.encode(), frame.body, b"\0"))


def encode_header(name: str, value: str) -> bytes:
    """One escaped header line, `b"name:value\\n"`, for splicing prebuilt frames."""
    return f"{_escape(name)}:{_escape(value)}\n".encode()


def parse_heartbeat(value: str | None) -> tuple[int, int]:
    """The `heart-beat` header as (can send every ms, wants to receive every ms); None is (0, 0)."""
    if value is None:
        return (0, 0)
    send, comma, receive = value.partition(",")
    pair = (_parse_uint(send), _parse_uint(receive))
    if not comma or pair[0] is None or pair[1] is None:
        raise MalformedFrame(
            f"invalid heart-beat {value[:_QUOTED_CHARS]!r}: "
            "expected 'cx,cy', two non-negative integers"
        )
    return (pair[0], pair[1])


def negotiate_heartbeat(mine: tuple[int, int], theirs: tuple[int, int]) -> tuple[int, int]:
    """(my send interval, interval I expect to hear from the peer) in ms; 0 is none.

    STOMP 1.2 "Heart-beating": each direction runs at the slower of what the sender
    can do and what the receiver wants, and not at all if either side says 0.
    """
    send = 0 if mine[0] == 0 or theirs[1] == 0 else max(mine[0], theirs[1])
    expect = 0 if mine[1] == 0 or theirs[0] == 0 else max(mine[1], theirs[0])
    return (send, expect)
