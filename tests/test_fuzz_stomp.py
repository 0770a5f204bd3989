"""Fuzzing the STOMP codec and the sans-IO `StompConnection` under hypothesis.

What is checked, for any input: arbitrary and STOMP-like bytes (mutated frames) fed in
arbitrary chunkings raise nothing but `StompProtocolError`s, and the same error again once
failed (sticky); the same bytes split anywhere give the same frames and the same error;
`encode` then parse gives the frame back (header escaping, repeated headers, NULs in a body
with `content-length`); the frame-size and header-count limits hold exactly. The
`StompConnection` is driven as a shell would drive it, in both roles.

Counts are small and the examples derandomized (a fixed sequence, no example database), so CI
runs the same cases every time in a few seconds. For a longer, random local run set
`FUZZ_EXAMPLES`, e.g. `FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz_*.py`:
every fuzz test then runs that many examples, randomized, with hypothesis's example database
(`.hypothesis/`) keeping what failed. `fuzz()` below is the one place the fuzz modules take
their settings from.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.protocol import events
from chat.protocol.connection import ConnectionLimits, Role, State, StompConnection
from chat.protocol.errors import FrameTooLarge, StompProtocolError
from chat.protocol.stomp import (
    CLIENT_COMMANDS,
    SERVER_COMMANDS,
    Frame,
    FrameParser,
    Limits,
    encode,
)

_EXAMPLES = os.environ.get("FUZZ_EXAMPLES")
settings.register_profile(
    "chat-fuzz",
    deadline=None,
    derandomize=_EXAMPLES is None,
    database=None if _EXAMPLES is None else settings.default.database,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,  # async fixtures are set up per example
    ],
    print_blob=True,
)
_PROFILE = settings.get_profile("chat-fuzz")


def fuzz(examples: int) -> settings:
    """The fuzz profile with `examples` examples (or `FUZZ_EXAMPLES`), as a decorator.

    The profile is applied per test, never loaded: loading it would change the settings of
    every other test module in the process.
    """
    return settings(_PROFILE, max_examples=int(_EXAMPLES) if _EXAMPLES else examples)


# ---------------------------------------------------------------- input strategies

HEADER_NAMES = (
    "destination", "id", "receipt", "content-length", "content-type", "heart-beat",
    "accept-version", "host", "ack", "since-offset", "last", "epoch", "receipt-id",
    "message-id", "subscription", "version", "message", "transaction", "x",
)  # fmt: skip
# Values that have broken parsers: numbers of every shape, escapes, separators, unicode.
TRICKY_VALUES = (
    "", "0", "1", "007", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10", "²", "١٢", "9" * 30,
    "9" * 5000, "10000,10000", "0,0", ",", "1,", ",1", "1,2,3", "99999999999999999999,1",
    "1.2", "1.0,1.1,1.2", "1.3", "auto", "client", "/topic/a", "/topic/a.*", "/topic/#",
    "/topic/", "/user/bob", "/presence/lobby", "/session/token", "/queue/x", "\\", "\\c",
    "\\n", "\\t", "a\\", ":", "\r", "\x00", "\x7f", "é", "\U0001f600", "\ud800", "a" * 300,
)  # fmt: skip

_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)
_COMMANDS = sorted(CLIENT_COMMANDS | SERVER_COMMANDS)


def _line(name: str, value: str) -> bytes:
    return f"{name}:{value}".encode("utf-8", "surrogatepass")


@st.composite
def stomp_like(draw: st.DrawFn, commands: tuple[str, ...] = tuple(_COMMANDS)) -> bytes:
    """One frame-shaped piece of input: a real or near command, header lines of known and
    random names with tricky values, CR/LF variants, a body, a NUL or not."""
    command = draw(
        st.one_of(
            st.sampled_from(commands),
            st.sampled_from(commands).map(str.lower),
            _TEXT,
        )
    )
    names = st.one_of(st.sampled_from(HEADER_NAMES), _TEXT)
    values = st.one_of(st.sampled_from(TRICKY_VALUES), _TEXT)
    lines = draw(
        st.lists(
            st.one_of(st.builds(_line, names, values), st.binary(max_size=12)),
            max_size=6,
        )
    )
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r", b""]))
    body = draw(st.binary(max_size=64))
    end = draw(st.sampled_from([b"\0", b"\0", b"\0\n", b"", b"\0\r\n", b"\r\0"]))
    head = eol.join([command.encode("utf-8", "surrogatepass"), *lines])
    return head + eol + eol + body + end


@st.composite
def mutated(draw: st.DrawFn, pieces: st.SearchStrategy[bytes]) -> bytes:
    """Pieces joined, then bytes flipped, inserted, deleted or cut off here and there."""
    data = bytearray(b"".join(draw(st.lists(pieces, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        if op == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif op == "insert":
            data[position:position] = draw(
                st.sampled_from([b"\0", b"\n", b"\r", b":", b"\\", b"\xff", b"\xc3", b"\n\n"])
            )
        elif op == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[position:]
        elif op == "duplicate":
            data[position:position] = data[position : position + draw(st.integers(1, 32))]
    return bytes(data)


FUZZ_BYTES = st.one_of(
    st.binary(max_size=300),
    mutated(stomp_like()),
    mutated(st.sampled_from([b"SEND\n\n\0", b"\n", b"\r\n", b"CONNECT\naccept-version:1.2\n\n\0"])),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at `cuts` (taken modulo its length): any chunking, including empty chunks."""
    positions = sorted([0, len(data), *(cut % (len(data) + 1) for cut in cuts)])
    return [data[a:b] for a, b in zip(positions, positions[1:], strict=False)]


CUTS = st.lists(st.integers(min_value=0), max_size=8)
LIMITS = st.builds(Limits, st.integers(8, 400), st.integers(0, 8)) | st.just(Limits())


# ---------------------------------------------------------------- the parser


def parse(
    data: list[bytes], limits: Limits, commands: frozenset[str]
) -> tuple[list[Frame], tuple[type, str] | None]:
    """Frames fed chunk by chunk, up to the first error; the error's (type, message)."""
    parser = FrameParser(limits, commands)
    frames: list[Frame] = []
    for chunk in data:
        try:
            frames += parser.feed(chunk)
        except StompProtocolError as exc:
            with pytest.raises(type(exc)) as again:  # sticky: the same error, whatever comes
                parser.feed(b"SEND\n\n\0")
            assert again.value is exc
            return frames, (type(exc), exc.message)
    return frames, None


def check_frame(frame: Frame, limits: Limits, commands: frozenset[str]) -> None:
    """What every parsed frame satisfies, whatever the input."""
    assert frame.command in commands
    assert len(frame.headers) <= limits.max_headers
    assert all(name for name, _ in frame.headers)
    # command, EOL, blank line, body: what the smallest head around this body weighs
    assert len(frame.command) + 2 + len(frame.body) <= limits.max_frame_bytes


ROLES = pytest.mark.parametrize(
    "commands", [CLIENT_COMMANDS, SERVER_COMMANDS], ids=["client-frames", "server-frames"]
)


@ROLES
@fuzz(150)
@given(data=FUZZ_BYTES, cuts=CUTS, limits=LIMITS)
def test_any_bytes_any_chunking_raise_only_protocol_errors(
    commands: frozenset[str], data: bytes, cuts: list[int], limits: Limits
) -> None:
    """Anything but a StompProtocolError escaping `feed()` fails here; every frame that comes
    out is within the limits and the direction's commands."""
    frames, _ = parse(split(data, cuts), limits, commands)
    for frame in frames:
        check_frame(frame, limits, commands)


@ROLES
@fuzz(150)
@given(data=FUZZ_BYTES, cuts=CUTS, limits=LIMITS)
def test_chunking_invariance(
    commands: frozenset[str], data: bytes, cuts: list[int], limits: Limits
) -> None:
    """Split anywhere, the same frames and the same error. Frames completed in the same
    `feed()` as an error are dropped with it, so a chunked run yields a prefix of what the
    byte-by-byte run yields (every frame completed before the error)."""
    whole = parse([data], limits, commands)
    bytewise = parse([data[i : i + 1] for i in range(len(data))], limits, commands)
    chunked = parse(split(data, cuts), limits, commands)
    assert whole[1] == bytewise[1] == chunked[1]
    if whole[1] is None:
        assert whole[0] == bytewise[0] == chunked[0]
    else:
        assert whole[0] == []
        assert chunked[0] == bytewise[0][: len(chunked[0])]


# ---------------------------------------------------------------- encode, then parse

# Any text a header may carry; no NUL (the frame's terminator) and no lone surrogates.
HEADER_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=24)
NAMES = st.one_of(st.sampled_from(HEADER_NAMES), HEADER_TEXT).filter(
    lambda name: name not in ("", "content-length")
)
RAW_NAMES = NAMES.filter(lambda name: not any(c in name for c in ":\r\n"))
RAW_VALUES = HEADER_TEXT.filter(lambda value: not any(c in value for c in "\r\n"))


@st.composite
def valid_frames(draw: st.DrawFn, commands: frozenset[str]) -> Frame:
    """A frame `encode` can write and a peer may send: escaped headers (raw ones for
    CONNECT/CONNECTED), repeats allowed, a body with NULs only behind a content-length."""
    command = draw(st.sampled_from(sorted(commands)))
    raw = command in ("CONNECT", "CONNECTED")
    pairs = st.tuples(RAW_NAMES, RAW_VALUES) if raw else st.tuples(NAMES, HEADER_TEXT)
    headers = draw(st.lists(pairs, max_size=6))
    if draw(st.booleans()):  # repeated header: the first one counts
        headers += headers[:1]
    body = draw(st.binary(max_size=200))
    if b"\0" in body or draw(st.booleans()):
        position = draw(st.integers(0, len(headers)))
        headers.insert(position, ("content-length", str(len(body))))
    return Frame(command, tuple(headers), body)


@ROLES
@fuzz(100)
@given(data=st.data(), cuts=CUTS)
def test_encode_then_parse_round_trips(
    commands: frozenset[str], data: st.DataObject, cuts: list[int]
) -> None:
    frames = data.draw(st.lists(valid_frames(commands), min_size=1, max_size=4))
    gaps = data.draw(
        st.lists(st.sampled_from([b"", b"\n", b"\r\n", b"\n\r\n\n"]), min_size=4, max_size=4)
    )
    wire = b"".join(gap + encode(frame) for gap, frame in zip(gaps, frames, strict=False))
    big = Limits(max_frame_bytes=1 << 20, max_headers=16)
    assert parse(split(wire, cuts), big, commands) == (frames, None)
    for frame in frames:
        assert frame.get("destination") == dict(reversed(frame.headers)).get("destination")


def frame_size(frame: Frame) -> int:
    """What the limit counts: command, headers and blank line, body; not the NUL."""
    return len(encode(frame)) - 1


@fuzz(150)
@given(
    frame=valid_frames(CLIENT_COMMANDS), limit=st.integers(16, 600), max_headers=st.integers(0, 8)
)
def test_limits_hold_exactly(frame: Frame, limit: int, max_headers: int) -> None:
    """A frame within both limits parses; one over either is FrameTooLarge, never anything
    else, whether it arrives whole or byte by byte."""
    wire = encode(frame)
    limits = Limits(limit, max_headers)
    fits = frame_size(frame) <= limit and len(frame.headers) <= max_headers
    for chunks in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        frames, error = parse(chunks, limits, CLIENT_COMMANDS)
        if fits:
            assert (frames, error) == ([frame], None)
        else:
            assert frames == []
            assert error is not None and error[0] is FrameTooLarge, error


@fuzz(100)
@given(count=st.integers(0, 40), max_headers=st.integers(0, 40))
def test_header_count_limit(count: int, max_headers: int) -> None:
    frame = Frame("SEND", tuple((f"h{i}", "v") for i in range(count)))
    frames, error = parse([encode(frame)], Limits(max_headers=max_headers), CLIENT_COMMANDS)
    if count <= max_headers:
        assert frames == [frame]
    else:
        assert error == (FrameTooLarge, f"frame has more than {max_headers} headers")


# ---------------------------------------------------------------- the connection state machine


def reply_as_server(conn: StompConnection, event: events.Event) -> None:
    """What a server shell does with each event: CONNECTED for a CONNECT, RECEIPT if asked."""
    if isinstance(event, events.Connect):
        conn.send(Frame("CONNECTED", (("version", event.version), ("heart-beat", "0,0"))), 0.0)
    if event.receipt is not None and conn.state in (State.CONNECTED, State.CLOSING):
        conn.send(Frame("RECEIPT", (("receipt-id", event.receipt),)), 0.0)


def drive(conn: StompConnection, chunks: list[bytes], answer: Callable[..., None]) -> None:
    """Feed `chunks`, taking every event; a protocol error must be sticky."""
    for now, chunk in enumerate(chunks):
        try:
            conn.receive_data(chunk, float(now))
            while (event := conn.next_event()) is not None:
                assert isinstance(event, events.Event)
                answer(conn, event)
        except StompProtocolError as exc:
            assert conn.state is State.ERROR
            for call in (lambda: conn.receive_data(b"\n", 99.0), conn.next_event):
                with pytest.raises(StompProtocolError) as again:
                    call()
                assert again.value is exc
            return


CLIENT_SESSION = st.lists(
    st.one_of(
        mutated(stomp_like(tuple(sorted(CLIENT_COMMANDS)))),
        st.sampled_from(
            [
                b"CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0",
                b"SEND\ndestination:/topic/a\nreceipt:r1\n\nhi\0",
                b"SUBSCRIBE\ndestination:/topic/a\nid:1\n\n\0",
                b"DISCONNECT\nreceipt:bye\n\n\0",
            ]
        ),
    ),
    max_size=6,
).map(b"".join)


@fuzz(80)
@given(data=CLIENT_SESSION, cuts=CUTS, limits=LIMITS)
def test_server_role_takes_any_client_bytes(data: bytes, cuts: list[int], limits: Limits) -> None:
    conn = StompConnection(Role.SERVER, limits=ConnectionLimits(limits))
    drive(conn, split(data, cuts), reply_as_server)


SERVER_SESSION = st.lists(
    st.one_of(
        mutated(stomp_like(tuple(sorted(SERVER_COMMANDS)))),
        st.sampled_from(
            [
                b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0",
                b"MESSAGE\ndestination:/topic/a\nsubscription:1\nmessage-id:m\n\nhi\0",
                b"RECEIPT\nreceipt-id:r1\n\n\0",
                b"ERROR\nmessage:no\nreceipt-id:r1\n\nbad\0",
            ]
        ),
    ),
    max_size=6,
).map(b"".join)


@fuzz(80)
@given(data=SERVER_SESSION, cuts=CUTS, limits=LIMITS)
def test_client_role_takes_any_server_bytes(data: bytes, cuts: list[int], limits: Limits) -> None:
    conn = StompConnection(Role.CLIENT, limits=ConnectionLimits(limits))
    conn.send(Frame("CONNECT", (("accept-version", "1.2"), ("heart-beat", "1000,1000"))), 0.0)
    drive(conn, split(data, cuts), send_after_connected)


def send_after_connected(conn: StompConnection, event: events.Event) -> None:
    """What a client does once connected: send, asking for receipt r1 (so one may come)."""
    if isinstance(event, events.Connected):
        conn.send(Frame("SEND", (("destination", "/topic/a"), ("receipt", "r1"))), 0.0)
