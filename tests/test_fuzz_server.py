"""Server-level fuzz: mutated STOMP frames and mutated WebSocket frames over real connections,
while a healthy subscriber on another connection keeps receiving.

Each example starts a server below TLS (tests/below_tls.py: memory streams, the mock clock),
connects bob (subscribed to `/topic/fuzz`) and carol (publishing to it with receipts), and
runs a few fuzzed connections of alice's at the same time. A fuzzed connection is a wsproto
client over the memory stream that completes the upgrade with a valid token, then sends
STOMP-like bytes (valid frames, near-valid frames, mutated ones) in WebSocket messages, or
raw, possibly broken, WebSocket frames. What must hold:

- the log shows no traceback and no "internal error";
- every fuzzed connection is answered: the server closes it with a close code (after an ERROR
  frame when the STOMP was at fault; never 1011), or it is a live session (CONNECTED, no
  ERROR, heart-beats not overdue) that closes cleanly when the client closes; one that is
  neither once the connect and close timeouts have passed is a hang;
- bob (the client library) receives every message carol published before and meanwhile, in
  order; every MESSAGE has the server's headers exactly once, an unforged sender and the next
  offset.

`test_fuzzed_frames_over_real_tls` sends a fixed set of such inputs over real TLS on loopback.
`test_the_largest_send_allowed_reaches_a_client_library_subscriber` pins what the fuzz found
at the edge of the limits.
Settings and `FUZZ_EXAMPLES`: see tests/test_fuzz_stomp.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import event, given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from chat.client.connection import StompClient
from chat.protocol.connection import SILENCE_FACTOR
from chat.protocol.stomp import (
    CLIENT_COMMANDS,
    SERVER_COMMANDS,
    Frame,
    FrameParser,
    Limits,
    negotiate_heartbeat,
    parse_heartbeat,
)
from chat.protocol.stomp import encode as encode_frame
from chat.protocol.wire import TEXT_PLAIN
from tests.conftest import RunningServer, TestPki, stomp_peer, token_for
from tests.test_fuzz_http import below_tls_server, no_traceback
from tests.test_fuzz_stomp import TRICKY_VALUES, fuzz, mutated, split, stomp_like

TOPIC = "/topic/fuzz"
CONNECT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
# A fuzzed connection that is not a live session must be closed by then.
ANSWER_WITHIN = CONNECT_TIMEOUT + CLOSE_TIMEOUT + 1
# Close codes the server may send on its own (PROTOCOL.md §6, RFC 6455 §7.4.1 for 1007).
SERVER_CLOSE_CODES = {1000, 1001, 1002, 1007, 1008, 1009}
CONNECT = b"CONNECT\naccept-version:1.2\nhost:chat\nheart-beat:0,0\n\n\0"
# The server's heart-beat offer: short, so a fuzzed CONNECT asking for heart-beats makes the
# server expect them within the time an example waits (bob and carol ask for none).
SERVER_HEARTBEAT = (1000, 1000)

# ---------------------------------------------------------------- a client that sends anything


def ws_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = b"abcd"
) -> bytes:
    """One RFC 6455 frame, written by hand so that it may break the rules (unmasked,
    reserved bits, unknown opcodes, oversized control frames)."""
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)
    masked = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head = bytes([first, masked | n])
    elif n < 1 << 16:
        head = bytes([first, masked | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, masked | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@dataclass
class FuzzClient:
    """A wsproto client over one stream: completes the upgrade, then writes any bytes and
    reads everything the server sends (STOMP frames, the close code, the end of the stream)."""

    stream: trio.abc.Stream
    ws: WSConnection = field(default_factory=lambda: WSConnection(ConnectionType.CLIENT))
    parser: FrameParser = field(
        default_factory=lambda: FrameParser(Limits(1 << 24, 1024), SERVER_COMMANDS)
    )
    frames: list[Frame] = field(default_factory=list)
    close_code: int | None = None
    ended: bool = False  # the server closed the stream

    async def upgrade(self, token: str) -> None:
        offer = ["v12.stomp", f"bearer.{token}"]
        await self.stream.send_all(self.ws.send(Request(host="chat.test", target="/ws",
                                                        subprotocols=offer)))  # fmt: skip
        while True:
            data = await self.stream.receive_some()
            assert data, "the server closed the stream instead of answering the upgrade"
            self.ws.receive_data(data)
            for answer in self.ws.events():
                assert not isinstance(answer, RejectConnection | RejectData), answer
                if isinstance(answer, AcceptConnection):
                    return

    def message(self, payload: bytes) -> bytes:
        """A well-formed WebSocket message: text when `payload` is UTF-8, else binary."""
        try:
            return self.ws.send(Message(data=payload.decode("utf-8")))
        except UnicodeDecodeError:
            return self.ws.send(Message(data=payload))

    async def write(self, data: bytes) -> bool:
        """False once the server has closed the stream."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def read_until_closed(self) -> None:
        while not self.ended:
            try:
                data = await self.stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.ended = True
                return
            self.ws.receive_data(data)
            for received in self.ws.events():
                await self._on(received)

    async def _on(self, received: object) -> None:
        if isinstance(received, TextMessage | BytesMessage):
            payload = received.data
            raw = payload.encode() if isinstance(payload, str) else bytes(payload)
            self.frames += self.parser.feed(raw)  # the server's STOMP must parse
        elif isinstance(received, CloseConnection):
            self.close_code = received.code
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                await self.write(self.ws.send(received.response()))
        elif isinstance(received, Ping):
            await self.write(self.ws.send(received.response()))

    @property
    def live_session(self) -> bool:
        commands = [frame.command for frame in self.frames]
        return "CONNECTED" in commands and "ERROR" not in commands

    def expected_heartbeat(self, offer: str) -> float:
        """How often (s) the server expects to hear from us, given our CONNECT's heart-beat
        `offer` and the server's in CONNECTED (STOMP 1.2 negotiation); 0: never."""
        for frame in self.frames:
            if frame.command == "CONNECTED":
                theirs = parse_heartbeat(frame.get("heart-beat"))
                _, expects = negotiate_heartbeat(theirs, parse_heartbeat(offer))
                return expects / 1000
        return 0.0

    async def close(self) -> None:
        """End the connection from our side: a close frame, then the stream if need be."""
        if self.ws.state is ConnectionState.OPEN:
            await self.write(self.ws.send(CloseConnection(1000)))
        with trio.move_on_after(CLOSE_TIMEOUT + 1):
            await self.read_until_closed()
        await trio.aclose_forcefully(self.stream)


# ---------------------------------------------------------------- what a fuzzed connection sends

VALUES = st.one_of(
    st.sampled_from(TRICKY_VALUES),
    st.sampled_from([TOPIC, "/topic/fuzz.*", "/topic/#", "/user/alice", "/presence/fuzz"]),
    st.text(max_size=12),
)
HEADERS_OF = {
    "CONNECT": ["accept-version", "host", "heart-beat", "login"],
    "STOMP": ["accept-version", "host", "heart-beat"],
    "SEND": [
        "destination",
        "receipt",
        "content-type",
        "content-length",
        "to",
        "sender",
        "message-id",
        "subscription",
        "timestamp",
        "offset",
        "epoch",
        "x-custom",
    ],
    "SUBSCRIBE": ["destination", "id", "ack", "since-offset", "last", "epoch", "receipt"],
    "UNSUBSCRIBE": ["id", "receipt"],
    "DISCONNECT": ["receipt"],
    "ACK": ["id", "transaction"],
    "NACK": ["id"],
    "BEGIN": ["transaction"],
    "COMMIT": ["transaction"],
    "ABORT": ["transaction"],
}


@st.composite
def session_frame(draw: st.DrawFn) -> bytes:
    """A frame the server's session logic must judge: the command's own headers, each
    present or not, with good and tricky values; escaped as the codec writes it."""
    command = draw(st.sampled_from(sorted(CLIENT_COMMANDS)))
    names = draw(st.lists(st.sampled_from(HEADERS_OF[command]), unique=True))
    headers = [(name, draw(VALUES)) for name in names if name != "content-length"]
    if command in ("CONNECT", "STOMP"):
        headers = [(n, v) for n, v in headers if not any(c in n + v for c in ":\r\n")]
    body = draw(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)))
    if "content-length" in names:
        length = draw(st.sampled_from([len(body), len(body) + 1, 0, max(len(body) - 1, 0)]))
        headers.append(("content-length", str(length)))
    else:
        body = body.replace(b"\0", b"")
    return write_frame(command, headers, body)


def write_frame(command: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """The frame as the codec writes it; what the codec refuses to write (a lone surrogate,
    a CONNECT header it cannot carry unescaped) is written as is, broken."""
    try:
        return encode_frame(Frame(command, tuple(headers), body))
    except ValueError:
        lines = [command, *(f"{n}:{v}" for n, v in headers), "", ""]
        return "\n".join(lines).encode("utf-8", "surrogatepass") + body + b"\0"


TOKEN = "{token}"  # replaced by alice's real token when sent
EPOCH = "{epoch}"  # replaced by the epoch of /topic/fuzz
GOOD_VALUES = {
    "destination": [TOPIC, TOPIC, "/topic/fuzz.*", "/topic/#", "/topic/other", "/user/alice",
                    "/user/bob", "/presence/fuzz", "/session/token"],
    "id": ["1", "2", "3"],
    "receipt": ["r1", "r2", "r3", "r1"],
    "since-offset": ["0", "1", "2", "3", "100"],
    "last": ["0", "1", "3", "1000"],
    "epoch": [EPOCH, EPOCH, "other"],
    "content-type": ["text/plain", "application/octet-stream"],
    "ack": ["auto", "client"],
}  # fmt: skip


@st.composite
def good_frame(draw: st.DrawFn) -> bytes:
    """A frame the session is likely to accept, so that a sequence of them gets far:
    subscriptions with replays and resumes, unsubscriptions, sends (a real token to
    /session/token among them), receipts, several frames per message."""
    command = draw(st.sampled_from(["SUBSCRIBE", "SUBSCRIBE", "SEND", "SEND", "UNSUBSCRIBE"]))
    if draw(st.integers(0, 9)) == 0:
        command = draw(st.sampled_from(["DISCONNECT", "ACK", "BEGIN", "CONNECT"]))
    names = draw(st.lists(st.sampled_from(HEADERS_OF[command]), unique=True))
    required = {"SUBSCRIBE": ["destination", "id"], "SEND": ["destination"]}
    names = [*required.get(command, []), *(n for n in names if n not in required.get(command, []))]
    headers = []
    for name in names:
        if name == "content-length":
            continue
        good = st.sampled_from(GOOD_VALUES.get(name, ["x"]))
        headers.append((name, draw(VALUES if draw(st.integers(0, 5)) == 0 else good)))
    body = b""
    if command == "SEND":
        body = draw(st.sampled_from([b"hi", TOKEN.encode(), b"", b"x" * 3000]))
    return write_frame(command, headers, body)


STOMP_PAYLOADS = st.one_of(
    session_frame(),
    mutated(session_frame()),
    mutated(stomp_like(tuple(sorted(CLIENT_COMMANDS)))),
    st.binary(max_size=64),
    st.sampled_from([b"\n", b"\r\n", b"\0"]),
    st.integers(65_000, 66_000).map(lambda n: b"SEND\ndestination:/topic/fuzz\n\n" + b"x" * n),
)

OPCODES = st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0x7, 0xB, 0xF])


@st.composite
def raw_ws_frames(draw: st.DrawFn) -> bytes:
    """One WebSocket frame that may break RFC 6455: any opcode, fin, reserved bits, mask,
    control frames too big or fragmented, close codes and reasons of every kind."""
    opcode = draw(OPCODES)
    if opcode == 0x8:
        code = draw(st.sampled_from([1000, 1001, 1002, 1005, 1006, 1015, 999, 3000, 4999, 5000]))
        payload = draw(
            st.one_of(
                st.just(b""),
                st.binary(min_size=1, max_size=1),
                st.binary(max_size=130).map(lambda reason: code.to_bytes(2, "big") + reason),
            )
        )
    else:
        payload = draw(
            st.one_of(st.binary(max_size=200), STOMP_PAYLOADS, st.just(b"\xff\xfe" + CONNECT))
        )
    frame = ws_frame(
        opcode,
        payload,
        fin=draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True,
        rsv=draw(st.integers(0, 7)) if draw(st.integers(0, 4)) == 0 else 0,
        mask=draw(st.none() | st.binary(min_size=4, max_size=4))
        if draw(st.booleans())
        else b"m4sk",
    )
    return draw(st.one_of(st.just(frame), mutated(st.just(frame))))


@dataclass(frozen=True)
class Plan:
    """What one fuzzed connection does after the upgrade."""

    kind: str  # "stomp": WebSocket messages of STOMP-like bytes; "ws": raw WebSocket frames
    connect_first: bool
    payloads: tuple[bytes, ...]
    cuts: tuple[int, ...] = ()  # "stomp": the payloads joined, then cut into messages here
    heartbeat: str = "0,0"  # the first CONNECT's offer

    @property
    def connect(self) -> bytes:
        return CONNECT.replace(b"heart-beat:0,0", f"heart-beat:{self.heartbeat}".encode())


HEARTBEATS = st.sampled_from(["0,0", "0,0", "0,0", "1,1", "1000,0", "0,1000", "2500,1", "9,99"])


PLANS = st.one_of(
    st.builds(
        Plan,
        st.just("stomp"),
        st.just(True),
        st.lists(good_frame(), min_size=1, max_size=8).map(tuple),
        st.lists(st.integers(min_value=0), max_size=4).map(tuple),
        HEARTBEATS,
    ),
    st.builds(
        Plan,
        st.just("stomp"),
        st.integers(0, 3).map(bool),
        st.lists(STOMP_PAYLOADS, min_size=1, max_size=5).map(tuple),
        st.just(()),
        HEARTBEATS,
    ),
    st.builds(
        Plan,
        st.just("ws"),
        st.booleans(),
        st.lists(raw_ws_frames(), min_size=1, max_size=4).map(tuple),
        st.just(()),
        HEARTBEATS,
    ),
)


def messages(plan: Plan, token: str, epoch: str) -> list[bytes]:
    """The payloads as sent: placeholders filled, re-cut into messages if the plan says."""
    payloads = [
        p.replace(TOKEN.encode(), token.encode()).replace(EPOCH.encode(), epoch.encode())
        for p in plan.payloads
    ]
    if plan.kind != "stomp" or not plan.cuts:
        return payloads
    return [m for m in split(b"".join(payloads), list(plan.cuts)) if m]


async def run_plan(client: FuzzClient, plan: Plan, token: str, epoch: str) -> None:
    """Send the plan, then wait for the server's answer; a session left open is closed by us."""
    if plan.connect_first:
        await client.write(client.message(plan.connect))
    for payload in messages(plan, token, epoch):
        data = client.message(payload) if plan.kind == "stomp" else payload
        if not await client.write(data):
            break
    with trio.move_on_after(ANSWER_WITHIN):
        await client.read_until_closed()
    check_answer(client, plan)
    if not client.ended:
        await client.close()


def check_answer(client: FuzzClient, plan: Plan) -> None:
    commands = [frame.command for frame in client.frames]
    event(f"{plan.kind}: {'live' if not client.ended else client.close_code}")
    event(f"{plan.kind} received {'+'.join(sorted(set(commands))) or 'no frame'}")
    if not client.ended:  # still open: only a live session may be, if heart-beats allow
        assert client.live_session, f"no answer within {ANSWER_WITHIN} s: {commands}"
        if plan.connect_first:  # the offer is known: ours, not a fuzzed one
            expects = client.expected_heartbeat(plan.heartbeat)
            event(f"live, heart-beats expected every {expects} s")
            assert not expects or SILENCE_FACTOR * expects + 1 > ANSWER_WITHIN, (
                f"silent for {ANSWER_WITHIN} s, heart-beats expected every {expects} s: open"
            )
        return
    assert client.close_code != 1011, "server error"
    if plan.kind == "stomp":
        assert client.close_code in SERVER_CLOSE_CODES, client.close_code
    if "ERROR" in commands:
        assert commands[-1] == "ERROR", commands  # nothing after the ERROR
        assert client.close_code is not None and client.close_code != 1000, client.close_code
        assert client.frames[-1].get("message"), client.frames[-1]


# ---------------------------------------------------------------- the examples


async def publish(carol, numbers: range) -> list[bytes]:  # type: ignore[no-untyped-def]
    """carol's messages, each acknowledged by a RECEIPT (stored), half a second apart."""
    bodies = []
    for n in numbers:
        body = f"healthy {n}".encode()
        await carol.send("SEND", {"destination": TOPIC, "receipt": f"p{n}"}, body)
        receipt = await carol.receive(timeout=30)
        assert (receipt.command, receipt.get("receipt-id")) == ("RECEIPT", f"p{n}"), receipt
        bodies.append(body)
        await trio.sleep(0.5)
    return bodies


# Headers the server sets on every MESSAGE, exactly once, whatever the SEND carried (§4, §8).
SERVER_SET = ("destination", "message-id", "subscription", "content-type", "content-length",
              "sender", "timestamp", "offset", "epoch")  # fmt: skip


async def received_from_carol(bob: StompClient, count: int, sub_id: str) -> list[bytes]:
    """The bodies of carol's next `count` messages to bob. Every MESSAGE on the way (alice's
    fuzzed sends too) has the server's headers exactly once, a sender nobody forged, and the
    next offset: no gap, no duplicate."""
    bodies = []
    offset = None
    while len(bodies) < count:
        with trio.fail_after(30):
            message = await bob.receive()
        frame = Frame("MESSAGE", message.headers, message.body)
        names = [name for name, _ in frame.headers]
        assert all(names.count(name) == 1 for name in SERVER_SET), frame
        assert frame.get("sender") in ("alice", "carol"), frame
        assert (frame.get("destination"), frame.get("subscription")) == (TOPIC, sub_id), frame
        assert frame.get("content-length") == str(len(frame.body)), frame
        if offset is not None:
            assert frame.get("offset") == str(offset + 1), (offset, frame)
        offset = int(frame.get("offset") or 0)
        if frame.get("sender") == "carol":
            bodies.append(frame.body)
    return bodies


BEFORE = 4  # published before the fuzz: history for replays and resumes to page in
PUBLISHED = 6  # published while the fuzzed connections run
RETENTION = 6  # fewer than published: resumes from early offsets are not recovered


@fuzz(40)
@given(plans=st.lists(PLANS, min_size=1, max_size=4))
async def test_fuzzed_connections_leave_the_server_and_a_subscriber_unharmed(
    pki: TestPki,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    plans: list[Plan],
) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="chat")
    async with below_tls_server(
        pki,
        tmp_path,
        connect_timeout=CONNECT_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        heartbeat=SERVER_HEARTBEAT,
        retention_count=RETENTION,
    ) as below:
        token = await below.token("alice")
        # bob is the client library: it takes a MESSAGE made of a SEND of the largest size
        # plus the server's headers (CLIENT_LIMITS), which a 64 KiB parser would refuse
        async with below.client("bob") as bob, below.stomp_peer("carol") as carol:
            subscribed = await bob.subscribe(TOPIC)
            assert subscribed.start is not None
            epoch = subscribed.start.epoch
            published = await publish(carol, range(BEFORE))

            async def fuzzed(plan: Plan) -> None:
                client = FuzzClient(below.open_stream("alice"))
                with trio.fail_after(CONNECT_TIMEOUT):  # the upgrade is answered at once
                    await client.upgrade(token)
                await run_plan(client, plan, token, epoch)

            async with trio.open_nursery() as nursery:
                for plan in plans:
                    nursery.start_soon(fuzzed, plan)
                published += await publish(carol, range(BEFORE, BEFORE + PUBLISHED))
            with trio.fail_after(CLOSE_TIMEOUT + 1):  # every fuzzed connection is gone
                while len(below.server.connections) > 2:
                    await trio.sleep(0.1)
            assert await received_from_carol(bob, len(published), subscribed.id) == published
    no_traceback(caplog)


# ---------------------------------------------------------------- one case over real TLS

REAL_TLS_INPUTS = [
    ("stomp", b"\xff\xfe not stomp\n\n\0"),
    ("stomp", b"SUBSCRIBE\ndestination:/topic/fuzz\nid:1\nsince-offset:\xc2\xb2\n\n\0"),
    ("stomp", b"SUBSCRIBE\ndestination:/topic/fuzz\nid:1\nlast:" + b"9" * 5000 + b"\n\n\0"),
    ("stomp", b"SEND\ndestination:/topic/fuzz\ncontent-length:2\n\nshort\0"),
    ("stomp", b"SEND\ndestination:/session/token\n\nnot a token\0"),
    ("stomp", b"SEND\n" + b"h:v\n" * 100 + b"\n\0"),
    ("ws", ws_frame(0x1, b"\xc3\x28 invalid utf-8")),
    ("ws", ws_frame(0x1, CONNECT, mask=None)),  # clients must mask
    ("ws", ws_frame(0x1, CONNECT, rsv=4)),
    ("ws", ws_frame(0x3, b"reserved opcode")),
    ("ws", ws_frame(0x9, b"p" * 126)),  # control frame over 125 bytes
    ("ws", ws_frame(0x8, b"\x03\xe7")),  # close code 999
]


async def test_fuzzed_frames_over_real_tls(
    server: RunningServer, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    """The same properties over real mutual TLS on loopback, for a fixed set of inputs that
    each end their connection at once (so no timeout is waited for in real time)."""
    caplog.set_level(logging.DEBUG, logger="chat")
    token = await token_for(server, pki, "alice")
    async with stomp_peer(server, pki, "bob") as bob, stomp_peer(server, pki, "carol") as carol:
        await bob.send("SUBSCRIBE", {"destination": TOPIC, "id": "s", "receipt": "r"})
        assert (await bob.receive()).command == "RECEIPT"

        async def fuzzed(kind: str, data: bytes) -> None:
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", server.port, ssl_context=pki.client_context("alice")
            )
            client = FuzzClient(stream)
            with trio.fail_after(5):
                await client.upgrade(token)
            await client.write(client.message(CONNECT))
            await client.write(client.message(data) if kind == "stomp" else data)
            with trio.fail_after(5):
                await client.read_until_closed()
            assert client.close_code in SERVER_CLOSE_CODES, (data[:40], client.close_code)
            assert client.close_code != 1000, data[:40]
            await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            for kind, data in REAL_TLS_INPUTS:
                nursery.start_soon(fuzzed, kind, data)
            await carol.send("SEND", {"destination": TOPIC, "receipt": "p"}, b"still here")
            assert (await carol.receive()).command == "RECEIPT"
        message = await bob.receive()
        assert (message.get("sender"), message.body) == ("carol", b"still here"), message
    no_traceback(caplog)


# ---------------------------------------------------------------- the largest SEND the server takes

LARGEST_SENDS = [
    pytest.param({}, 0, id="default-limits"),
    pytest.param(
        {"max_frame_bytes": 1 << 20, "outbound_buffer_bytes": 4 << 20},
        0,
        id="max-frame-bytes-1MiB",
    ),
    pytest.param(
        {"max_headers": 200},
        150,
        id="max-headers-200",
    ),
]


def largest_body(limit: int, headers: list[tuple[str, str]]) -> int:
    """The body size that makes the client library's SEND exactly `limit` bytes."""

    def head(size: int) -> int:
        own = (
            ("destination", "/topic/big"),
            ("content-type", TEXT_PLAIN),
            ("content-length", str(size)),
            *headers,
            ("receipt", "r-1"),  # the client's first request on its connection
        )
        return len(encode_frame(Frame("SEND", own))) - 1

    size = limit - head(limit)
    while head(size + 1) + size + 1 <= limit:
        size += 1
    return size


@pytest.mark.parametrize(("config", "extra_headers"), LARGEST_SENDS)
async def test_the_largest_send_allowed_reaches_a_client_library_subscriber(
    pki: TestPki,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    config: dict[str, int],
    extra_headers: int,
) -> None:
    """What the fuzz found at the edge: a MESSAGE is its SEND plus the server's headers, so a
    SEND at the server's limits makes a MESSAGE over them. Whatever the server accepts must
    still reach a subscriber using the client library, or one sender breaks every
    subscriber's connection."""
    async with below_tls_server(pki, tmp_path, **config) as below:
        limits = below.server.config
        headers = [(f"x-{n}", "v") for n in range(extra_headers)]
        body = b"x" * largest_body(limits.max_frame_bytes, headers)
        async with below.client("bob") as bob, below.client("alice") as alice:
            await bob.subscribe("/topic/big")
            await alice.send("/topic/big", body, headers=headers)
            with trio.fail_after(10):
                message = await bob.receive()
            assert message.body == body
