"""The STOMP 1.2 codec, fed plain bytes: whole, byte by byte, split at every position."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.protocol.errors import (
    CloseCode,
    FrameTooLarge,
    MalformedFrame,
    MissingHeader,
    StompProtocolError,
    UnknownCommand,
)
from chat.protocol.stomp import (
    CLIENT_COMMANDS,
    HEARTBEAT,
    MAX_FRAME_BYTES,
    SERVER_COMMANDS,
    Frame,
    FrameParser,
    Limits,
    UnencodableHeader,
    encode,
    encode_header,
    negotiate_heartbeat,
    parse_heartbeat,
)

SMALL = Limits(max_frame_bytes=64, max_headers=4)

# An unfinished frame after the input: it must stay buffered, then complete.
TRAILER_START = b"SEND\ndestination:/topic/t\n\npart"
TRAILER_END = b"ial\0"
TRAILER = Frame("SEND", (("destination", "/topic/t"),), b"partial")


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, and cut in two at every position."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]


def feed_all(parser: FrameParser, chunks: list[bytes]) -> list[Frame]:
    return [frame for chunk in chunks for frame in parser.feed(chunk)]


VALID = [
    ("minimal", b"DISCONNECT\n\n\0", [Frame("DISCONNECT")]),
    (
        "headers and body",
        b"SEND\ndestination:/topic/a\nreceipt:7\n\nhello\0",
        [Frame("SEND", (("destination", "/topic/a"), ("receipt", "7")), b"hello")],
    ),
    (
        "CRLF line endings",
        b"SEND\r\ndestination:/topic/a\r\n\r\nhi\0",
        [Frame("SEND", (("destination", "/topic/a"),), b"hi")],
    ),
    (
        "escapes",
        b"SEND\na\\cb:x\\ny\\\\z\\r\n\nbody\0",
        [Frame("SEND", (("a:b", "x\ny\\z\r"),), b"body")],
    ),
    (
        "CONNECT is not unescaped",
        b"CONNECT\naccept-version:1.2\nlogin:a\\nb\npasscode:x:y\n\n\0",
        [Frame("CONNECT", (("accept-version", "1.2"), ("login", "a\\nb"), ("passcode", "x:y")))],
    ),
    (
        "content-length with NULs in the body",
        b"SEND\ncontent-length:5\n\na\0b\0c\0",
        [Frame("SEND", (("content-length", "5"),), b"a\0b\0c")],
    ),
    (
        "content-length zero",
        b"SEND\ncontent-length:0\n\n\0",
        [Frame("SEND", (("content-length", "0"),))],
    ),
    (
        "content-length with leading zeros",
        b"SEND\ncontent-length:002\n\n\0\0\0",
        [Frame("SEND", (("content-length", "002"),), b"\0\0")],
    ),
    (
        "repeated headers kept in order",
        b"SEND\nfoo:1\nfoo:2\n\n\0",
        [Frame("SEND", (("foo", "1"), ("foo", "2")))],
    ),
    ("empty header value", b"SEND\nfoo:\n\n\0", [Frame("SEND", (("foo", ""),))]),
    ("colon inside a value", b"SEND\nfoo:a:b\n\n\0", [Frame("SEND", (("foo", "a:b"),))]),
    (
        "UTF-8 header",
        "SEND\nключ:значение\n\n\0".encode(),
        [Frame("SEND", (("ключ", "значение"),))],
    ),
    (
        "body with EOLs and binary bytes",
        b"SEND\n\n\r\n\xff\n\0",
        [Frame("SEND", (), b"\r\n\xff\n")],
    ),
    (
        "heart-beats around and between frames",
        b"\n\r\n\nBEGIN\ntransaction:t\n\n\0\n\r\n\nCOMMIT\ntransaction:t\n\n\0\r\n\n",
        [Frame("BEGIN", (("transaction", "t"),)), Frame("COMMIT", (("transaction", "t"),))],
    ),
    (
        "several frames back to back",
        b"SUBSCRIBE\nid:1\ndestination:/topic/a\n\n\0SEND\ncontent-length:1\n\n\0\0UNSUBSCRIBE\nid:1\n\n\0",
        [
            Frame("SUBSCRIBE", (("id", "1"), ("destination", "/topic/a"))),
            Frame("SEND", (("content-length", "1"),), b"\0"),
            Frame("UNSUBSCRIBE", (("id", "1"),)),
        ],
    ),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_input_every_way(data: bytes, expected: list[Frame]) -> None:
    for chunks in chunkings(data + TRAILER_START):
        parser = FrameParser()
        assert feed_all(parser, chunks) == expected
        assert parser.feed(TRAILER_END) == [TRAILER]


def test_only_heartbeats_yield_nothing() -> None:
    parser = FrameParser(SMALL)
    assert parser.feed(HEARTBEAT * 100_000) == []  # never counted against the frame limit
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\nDISCONNECT\n\n\0") == [Frame("DISCONNECT")]


def test_server_commands() -> None:
    data = b"CONNECTED\nversion:1.2\nserver:a\\cb\n\n\0MESSAGE\nx:a\\cb\n\n\0"
    parser = FrameParser(commands=SERVER_COMMANDS)
    assert parser.feed(data) == [
        Frame("CONNECTED", (("version", "1.2"), ("server", "a\\cb"))),
        Frame("MESSAGE", (("x", "a:b"),)),
    ]
    with pytest.raises(UnknownCommand):
        FrameParser(commands=SERVER_COMMANDS).feed(b"SEND\n\n\0")


def test_frame_of_exactly_the_limit() -> None:
    head = b"SEND\n\n"
    exact = head + b"x" * (SMALL.max_frame_bytes - len(head))
    assert FrameParser(SMALL).feed(exact + b"\0") == [Frame("SEND", (), exact[len(head) :])]
    with pytest.raises(FrameTooLarge):
        FrameParser(SMALL).feed(exact + b"x\0")


def test_content_length_frame_of_exactly_the_limit() -> None:
    head = b"SEND\ncontent-length:43\n\n"
    size = SMALL.max_frame_bytes - len(head)
    data = head.replace(b"43", str(size).encode())
    assert len(data) + size == SMALL.max_frame_bytes
    assert FrameParser(SMALL).feed(data + b"\0" * (size + 1))[0].body == b"\0" * size
    with pytest.raises(FrameTooLarge):
        FrameParser(SMALL).feed(data.replace(str(size).encode(), str(size + 1).encode()))


def test_default_limit_applies_to_large_frames() -> None:
    body = b"x" * (MAX_FRAME_BYTES - len(b"SEND\n\n"))
    assert FrameParser().feed(b"SEND\n\n" + body + b"\0")[0].body == body
    parser = FrameParser()
    assert parser.feed(b"SEND\n\n" + body[:1000]) == []
    with pytest.raises(FrameTooLarge, match=f"frame exceeds {MAX_FRAME_BYTES} bytes"):
        parser.feed(body)  # over the limit and still no NUL: fail without waiting for it


@pytest.mark.parametrize(
    "unfinished",
    [
        b"SEND\n\n" + b"x" * 59,  # body without its NUL
        b"SEND\n" + b"a:b\n" * 15,  # header block without its blank line
        b"SEND\ncontent-length:59\n\n",  # declared body above the limit: fail at the header
    ],
    ids=["body", "header block", "content-length"],
)
def test_unfinished_frame_over_the_limit_fails_at_once(unfinished: bytes) -> None:
    with pytest.raises(FrameTooLarge) as info:
        FrameParser(SMALL).feed(unfinished)
    assert info.value.close_code == CloseCode.TOO_BIG


ERRORS = [
    ("unknown command", b"FOO\n\n\0", UnknownCommand, "unknown command 'FOO'"),
    ("commands are case-sensitive", b"send\n\n\0", UnknownCommand, "unknown command 'send'"),
    ("server command from a client", b"MESSAGE\n\n\0", UnknownCommand, "'MESSAGE'"),
    ("header without colon", b"SEND\nfoo\n\n\0", MalformedFrame, "header line without ':'"),
    ("empty header name", b"SEND\n:v\n\n\0", MalformedFrame, "empty header name"),
    ("undefined escape", b"SEND\nfoo:a\\tb\n\n\0", MalformedFrame, "undefined escape '\\t'"),
    ("dangling backslash", b"SEND\nfoo:a\\\n\n\0", MalformedFrame, "undefined escape '\\'"),
    ("escape in a name", b"SEND\nf\\xo:a\n\n\0", MalformedFrame, "undefined escape '\\x'"),
    ("invalid UTF-8", b"SEND\nfoo:\xff\n\n\0", MalformedFrame, "not valid UTF-8"),
    ("bare CR in a header", b"SEND\nfoo:a\rb\n\n\0", MalformedFrame, "bare CR"),
    ("bare CR before a frame", b"\rSEND\n\n\0", MalformedFrame, "bare CR"),
    ("NUL in the header", b"SEND\nfoo:a\0\n\n\0", MalformedFrame, "NUL byte in frame header"),
    ("content-length letters", b"SEND\ncontent-length:ab\n\n\0", MalformedFrame, "'ab'"),
    ("content-length negative", b"SEND\ncontent-length:-1\n\n\0", MalformedFrame, "'-1'"),
    ("content-length plus", b"SEND\ncontent-length:+1\n\nx\0", MalformedFrame, "'+1'"),
    ("content-length space", b"SEND\ncontent-length: 1\n\nx\0", MalformedFrame, "' 1'"),
    ("content-length empty", b"SEND\ncontent-length:\n\n\0", MalformedFrame, "''"),
    ("content-length non-ASCII", "SEND\ncontent-length:١\n\nx\0".encode(), MalformedFrame, "'١'"),
    ("content-length too short", b"SEND\ncontent-length:2\n\nabc\0", MalformedFrame, "no NUL"),
    ("too many headers", b"SEND\na:1\nb:2\nc:3\nd:4\ne:5\n\n\0", FrameTooLarge, "more than 4"),
    ("frame over the limit", b"SEND\n\n" + b"x" * 59 + b"\0", FrameTooLarge, "exceeds 64 bytes"),
    ("header block over the limit", b"SEND\n" + b"a:b\n" * 15 + b"\n\0", FrameTooLarge, "exceeds"),
    ("content-length over the limit", b"SEND\ncontent-length:99\n\n\0", FrameTooLarge, "exceeds"),
    ("content-length huge", b"SEND\ncontent-length:" + b"9" * 5000 + b"\n\n\0", FrameTooLarge, ""),
]
CLOSE_CODES = {
    UnknownCommand: CloseCode.PROTOCOL_ERROR,
    MalformedFrame: CloseCode.PROTOCOL_ERROR,
    FrameTooLarge: CloseCode.TOO_BIG,
}


@pytest.mark.parametrize(
    ("data", "error", "message"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS]
)
def test_error_every_way(data: bytes, error: type[StompProtocolError], message: str) -> None:
    limits = Limits(max_frame_bytes=10_000, max_headers=4) if len(data) > 1000 else SMALL
    ways = chunkings(data + TRAILER_START) if len(data) < 200 else iter([[data], [data, b""]])
    for chunks in ways:
        parser = FrameParser(limits)
        with pytest.raises(StompProtocolError) as info:
            feed_all(parser, chunks)
        assert type(info.value) is error
        assert info.value.close_code == CLOSE_CODES[error]
        assert message in str(info.value)


def test_error_after_good_frames_in_the_same_feed() -> None:
    with pytest.raises(UnknownCommand):
        FrameParser().feed(b"SEND\n\nok\0FOO\n\n\0")


def test_failure_is_sticky() -> None:
    parser = FrameParser()
    assert parser.feed(b"SEND\n\nok\0") == [Frame("SEND", (), b"ok")]
    with pytest.raises(MalformedFrame) as first:
        parser.feed(b"SEND\nbroken\n\n\0")
    for later in (b"SEND\n\nok\0", b"", HEARTBEAT):
        with pytest.raises(MalformedFrame) as again:
            parser.feed(later)
        assert again.value is first.value


def test_get_and_require() -> None:
    frame = Frame("SUBSCRIBE", (("id", "1"), ("id", "2"), ("ack", "")))
    assert frame.get("id") == "1"  # STOMP 1.2: the first repeated header wins
    assert frame.get("ack") == ""
    assert frame.get("destination") is None
    assert frame.get("destination", "x") == "x"
    assert frame.require("id") == "1"
    with pytest.raises(MissingHeader) as info:
        frame.require("destination")
    assert str(info.value) == "missing header 'destination'"
    assert "SUBSCRIBE" in info.value.detail
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


def test_encode_exact_bytes() -> None:
    frame = Frame("MESSAGE", (("destination", "/topic/a"), ("k:\n", "v\\\r:")), b"hi")
    assert encode(frame) == b"MESSAGE\ndestination:/topic/a\nk\\c\\n:v\\\\\\r\\c\n\nhi\0"
    assert encode(Frame("RECEIPT")) == b"RECEIPT\n\n\0"


def test_encode_adds_no_content_length() -> None:
    assert encode(Frame("SEND", (), b"a\0b")) == b"SEND\n\na\0b\0"


def test_encode_connect_and_connected_unescaped() -> None:
    headers = (("passcode", "a:b\\c"),)
    assert encode(Frame("CONNECT", headers)) == b"CONNECT\npasscode:a:b\\c\n\n\0"
    assert encode(Frame("CONNECTED", headers)) == b"CONNECTED\npasscode:a:b\\c\n\n\0"
    assert encode(Frame("STOMP", headers)) == b"STOMP\npasscode:a\\cb\\\\c\n\n\0"


@pytest.mark.parametrize(
    ("name", "value"), [("user-name", "eve\nadmin:yes"), ("a\r", "b"), ("a:b", "c"), ("", "c")]
)
def test_encode_refuses_header_injection_in_connected(name: str, value: str) -> None:
    with pytest.raises(UnencodableHeader):
        encode(Frame("CONNECTED", ((name, value),)))


def test_encode_header() -> None:
    assert encode_header("subscription", "s-1") == b"subscription:s-1\n"
    assert encode_header("a:b", "c\nd\\") == b"a\\cb:c\\nd\\\\\n"
    assert encode_header("naïve", "ü") == "naïve:ü\n".encode()


HEADER_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"))
NAME = HEADER_TEXT.filter(lambda name: name not in ("", "content-length"))
HEADERS = st.lists(st.tuples(NAME, HEADER_TEXT), max_size=6)
BIG = Limits(max_frame_bytes=1 << 20, max_headers=16)


@given(
    command=st.sampled_from(sorted(CLIENT_COMMANDS - {"CONNECT"})),
    headers=HEADERS,
    body=st.binary(max_size=300),
    cut=st.integers(min_value=0),
)
def test_roundtrip_escaped(
    command: str, headers: list[tuple[str, str]], body: bytes, cut: int
) -> None:
    frame = Frame(command, (("content-length", str(len(body))), *headers), body)
    data = encode(frame)
    cut %= len(data) + 1
    parser = FrameParser(BIG)
    assert parser.feed(data[:cut]) + parser.feed(data[cut:]) == [frame]


RAW_NAME = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\0\r\n:"), min_size=1
).filter(lambda name: name != "content-length")
RAW_VALUE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0\r\n"))


@given(headers=st.lists(st.tuples(RAW_NAME, RAW_VALUE), max_size=6))
def test_roundtrip_connect_raw(headers: list[tuple[str, str]]) -> None:
    frame = Frame("CONNECT", tuple(headers))
    assert FrameParser(BIG).feed(encode(frame)) == [frame]
    connected = Frame("CONNECTED", tuple(headers))
    assert FrameParser(BIG, SERVER_COMMANDS).feed(encode(connected)) == [connected]


FRAMES = st.builds(
    Frame,
    command=st.sampled_from(["SEND", "SUBSCRIBE", "ACK"]),
    headers=st.lists(st.tuples(NAME, HEADER_TEXT), max_size=3).map(tuple),
    body=st.binary(max_size=40).map(lambda body: body.replace(b"\0", b"")),
)


@given(
    frames=st.lists(FRAMES, max_size=5),
    gaps=st.lists(st.sampled_from([b"", b"\n", b"\r\n", b"\n\n\r\n"]), min_size=6, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_stream_of_frames_any_chunking(
    frames: list[Frame], gaps: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(gap + encode(frame) for gap, frame in zip(gaps, frames, strict=False))
    positions = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    chunks = [data[a:b] for a, b in zip(positions, positions[1:], strict=False)]
    assert feed_all(FrameParser(BIG), chunks) == frames


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, (0, 0)), ("0,0", (0, 0)), ("10000,5000", (10000, 5000)), ("007,8", (7, 8))],
)
def test_parse_heartbeat(value: str | None, expected: tuple[int, int]) -> None:
    assert parse_heartbeat(value) == expected


@pytest.mark.parametrize(
    "value", ["", "1", "1,2,3", "-1,0", "a,b", " 1,2", "1,2 ", "1.5,2", "１,2", ","]
)
def test_parse_heartbeat_rejects(value: str) -> None:
    with pytest.raises(MalformedFrame, match="invalid heart-beat") as info:
        parse_heartbeat(value)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        ((10000, 10000), (0, 0), (0, 0)),  # the peer cannot send and wants nothing
        ((10000, 10000), (5000, 20000), (20000, 10000)),  # each side: the slower of the two
        ((10000, 10000), (20000, 5000), (10000, 20000)),
        ((0, 10000), (5000, 5000), (0, 10000)),  # I cannot send
        ((10000, 0), (5000, 5000), (10000, 0)),  # I want nothing
        ((10000, 10000), (0, 3000), (10000, 0)),  # the peer sends nothing
        ((10000, 10000), (3000, 0), (0, 10000)),  # the peer wants nothing
        ((0, 0), (1000, 1000), (0, 0)),
    ],
)
def test_negotiate_heartbeat(
    mine: tuple[int, int], theirs: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert negotiate_heartbeat(mine, theirs) == expected


TOKENS = st.sampled_from(
    [b"SEND", b"ACK", b"\n", b"\r", b"\r\n", b":", b"a", b"\\", b"\\n", b"\\t", b"\0", b"\xff"]
    + [b"content-length:", b"1", b"x" * 20]
)


@given(data=st.lists(TOKENS, max_size=30).map(b"".join), cut=st.integers(min_value=0))
def test_any_input_parses_the_same_whole_or_split(data: bytes, cut: int) -> None:
    def outcome(chunks: list[bytes]) -> list[Frame] | type[StompProtocolError]:
        try:
            return feed_all(FrameParser(SMALL), chunks)
        except StompProtocolError as exc:  # nothing else may escape the parser
            return type(exc)

    cut %= len(data) + 1
    assert outcome([data]) == outcome([data[:cut], data[cut:]])
