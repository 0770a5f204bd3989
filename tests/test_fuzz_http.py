"""Fuzzing the HTTP side under hypothesis: the upgrade decision and the request-head reading.

`authorize` and `is_upgrade` (chat/server/upgrade.py) are pure: for any request and any token
(valid, mutated, forged, garbage) they return an `Upgrade` naming only a STOMP version, or
raise an `HttpRefusal`. `ChatServer.serve_stream` is driven below TLS (tests/below_tls.py,
memory streams on the mock clock) with mutated request heads and bodies: every connection gets
an HTTP response, a JSON refusal or a route's own answer, or is closed at the head deadline
when its head never completes; the log never shows a traceback. Settings and `FUZZ_EXAMPLES`:
see tests/test_fuzz_stomp.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import event, example, given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.utilities import RemoteProtocolError as WsProtocolError

from chat.protocol.errors import HttpRefusal
from chat.protocol.tokens import TokenAuthority
from chat.protocol.wire import STOMP_SUBPROTOCOLS
from chat.server.app import MAX_REQUEST_BODY, MAX_REQUEST_HEAD
from chat.server.http_api import Peer, Request
from chat.server.upgrade import Upgrade, authorize, is_upgrade, offered_subprotocols
from tests.below_tls import BelowTls, start_below_tls
from tests.conftest import TestPki
from tests.test_fuzz_stomp import fuzz, mutated, split

NOW = 1_800_000_000.0
PEER = Peer("alice", "x5t-of-alice")

# ---------------------------------------------------------------- tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: object, claims: object, signature: bytes = b"sig") -> str:
    """A JWT-shaped string with any header and claims: alg none, unknown kid, odd types."""
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
FORGED = st.builds(
    _forged,
    st.one_of(
        st.fixed_dictionaries(
            {"alg": st.sampled_from(["none", "HS256", "ES256", "RS256", "", "ES512"])},
            optional={"kid": st.one_of(st.text(max_size=10), JSON_VALUES), "typ": JSON_VALUES},
        ),
        JSON_VALUES,
    ),
    st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "sub": st.one_of(st.just("alice"), JSON_VALUES),
                "exp": st.one_of(st.integers(), st.floats(), JSON_VALUES),
                "nbf": JSON_VALUES,
                "iat": JSON_VALUES,
                "aud": st.one_of(st.just("chat"), JSON_VALUES),
                "iss": st.one_of(st.just("chat"), JSON_VALUES),
                "jti": JSON_VALUES,
                "cnf": st.one_of(st.fixed_dictionaries({"x5t#S256": JSON_VALUES}), JSON_VALUES),
            },
        ),
        JSON_VALUES,
    ),
    st.binary(max_size=80),
)


@st.composite
def tokens(draw: st.DrawFn, valid: str) -> str:
    """A real token, one cut or flipped, a forged one, or any text."""
    choice = draw(st.sampled_from(["valid", "valid", "mutated", "forged", "text", "segments"]))
    if choice == "valid":
        return valid
    if choice == "mutated":
        raw = draw(mutated(st.just(valid.encode())))
        return raw.decode("latin-1")
    if choice == "forged":
        return draw(FORGED)
    if choice == "segments":
        return ".".join(draw(st.lists(st.text("AZaz09-_=+/", max_size=30), max_size=5)))
    return draw(st.text(max_size=60))


# What h11 lets through in a header value: visible ASCII, spaces, and obs-text (latin-1).
MOSTLY = st.sampled_from([True, True, True, True, False])  # True first: what shrinking keeps
ASCII_VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
H11_VALUE_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")


@st.composite
def upgrade_requests(draw: st.DrawFn, token: str) -> Request:
    odd = ["v13.stomp", "stomp", "", " ", "bearer.", "V12.STOMP"]
    entries = draw(
        st.lists(st.sampled_from([*STOMP_SUBPROTOCOLS, *STOMP_SUBPROTOCOLS, *odd]), max_size=2)
    )
    entries += draw(st.lists(tokens(token).map(lambda t: "bearer." + t), min_size=1, max_size=2))
    entries += draw(
        st.lists(st.text(ASCII_VISIBLE, max_size=20) | st.text(max_size=20), max_size=1)
    )
    entries = draw(st.permutations(entries))
    if draw(MOSTLY):  # mostly what h11 and wsproto can take: ASCII
        entries = [entry.encode("ascii", "ignore").decode() for entry in entries]
    separator = draw(st.sampled_from([", ", ",", " , ", ";"]))
    values = st.one_of(
        *[st.text(ASCII_VISIBLE, max_size=30)] * 4,
        st.text(H11_VALUE_CHARS, max_size=30).map(str.strip),
        st.text(max_size=30),
    )
    headers = [("sec-websocket-protocol", separator.join(entries))]
    if draw(MOSTLY):
        headers.insert(0, ("host", "chat.test"))
    if draw(st.booleans()):  # the header repeated: RFC 9110 joins the values
        headers.append(("sec-websocket-protocol", draw(values)))
    headers += draw(
        st.lists(
            st.tuples(
                st.sampled_from(["upgrade", "connection", "sec-websocket-key", "x", "x", "host"]),
                values,
            ),
            max_size=2,
        )
    )
    method = draw(st.sampled_from(["GET", "POST", "get", "HEAD", ""]))
    return Request(method, draw(st.sampled_from(["/ws", "/", "/ws/", ""])), tuple(headers), b"")


@pytest.fixture(scope="module")
def valid_token(authority: TokenAuthority) -> str:
    return authority.issue(PEER.identity, PEER.x5t, NOW)[0]


@fuzz(100)
@given(data=st.data(), revoked=st.booleans(), skew=st.sampled_from([0.0, 0.0, 10_000.0, -10_000.0]))
def test_authorize_answers_every_request(
    authority: TokenAuthority, valid_token: str, data: st.DataObject, revoked: bool, skew: float
) -> None:
    """An Upgrade with only a STOMP version, or an HttpRefusal; nothing else, ever."""
    request = data.draw(upgrade_requests(valid_token))
    assert isinstance(is_upgrade(request), bool)
    offered = offered_subprotocols(request)
    try:
        upgrade = authorize(request, PEER, authority, lambda claims: revoked, NOW + skew)
    except HttpRefusal as refusal:
        event(f"refused {refusal.code}")
        assert 400 <= refusal.status < 500
        assert refusal.code and isinstance(refusal.detail, str)
        return
    event("upgraded")
    assert isinstance(upgrade, Upgrade)
    # what the server does next, as app.py does it: wsproto refuses or accepts, no crash
    with contextlib.suppress(WsProtocolError):
        WSConnection(ConnectionType.SERVER).initiate_upgrade_connection(
            [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers], "/ws"
        )
    assert upgrade.subprotocol in STOMP_SUBPROTOCOLS and upgrade.subprotocol in offered
    assert not revoked and upgrade.claims.sub == PEER.identity
    assert [entry for entry in offered if entry.startswith("bearer.")] == ["bearer." + valid_token]


# ---------------------------------------------------------------- request heads below TLS

HEAD_DEADLINE = 10.0  # handshake_timeout: the request head must arrive by then
ROUTES = [
    ("GET", "/healthz"),
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/auth/me"),
    ("POST", "/auth/token"),
    ("POST", "/auth/refresh"),
    ("GET", "/ws"),
    ("GET", "/nowhere"),
    ("DELETE", "/healthz"),
]
HEADER_NAMES = [
    "Host", "Content-Length", "Transfer-Encoding", "Upgrade", "Connection", "Expect",
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol", "Content-Type",
]  # fmt: skip
HEADER_VALUES = [
    "websocket", "Upgrade", "chunked", "gzip, chunked", "100-continue", "13", "0", "-1",
    "99999999999999999999", "1, 2", "dGhlIHNhbXBsZSBub25jZQ==", "v12.stomp, bearer.x",
    "application/json", "close", "", " ", "\t", "é", "a" * 200,
]  # fmt: skip
BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=60),
    st.builds(lambda v: json.dumps({"refresh_token": v}).encode(), JSON_VALUES),
    st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES),
    st.integers(MAX_REQUEST_BODY - 2, MAX_REQUEST_BODY + 2).map(lambda n: b"x" * n),
    st.integers(1, 9000).map(lambda n: b"[" * n),  # deep nesting: RecursionError in json
    st.integers(1, 9000).map(lambda n: b'{"refresh_token": ' + b"7" * n + b"}"),  # int limit
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """An HTTP/1.x request, hand-written (so it may be wrong), then mutated."""
    method, path = draw(st.sampled_from(ROUTES))
    method = draw(st.one_of(st.just(method), st.sampled_from(["GET", "PUT", "G ET", "\x00"])))
    target = draw(
        st.one_of(
            st.just(path),
            st.just(path + "?a=b"),
            st.sampled_from(["*", "http://x/healthz", "/%00", "/\xff", "//ws", ""]),
        )
    )
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 x"]))
    body = draw(BODIES)
    headers = [("Host", "chat.test")] if draw(st.integers(0, 4)) else []
    if draw(st.integers(0, 4)):
        headers.append(("Content-Length", str(len(body))))
    headers += draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(HEADER_NAMES), st.text(max_size=10)),
                st.one_of(st.sampled_from(HEADER_VALUES), st.text(max_size=20)),
            ),
            max_size=3,
        )
    )
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers)]
    head = (eol.join(lines) + eol + eol).encode("utf-8", "surrogatepass")
    return draw(st.one_of(st.just(head + body), mutated(st.just(head + body))))


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


async def read_all(stream: trio.abc.Stream) -> bytes:
    answer = bytearray()
    try:
        while data := await stream.receive_some():
            answer += data
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return bytes(answer)


def check_answer(answer: bytes) -> int:
    """The server's bytes are one HTTP response; a refusal has the JSON shape. Its status."""
    if answer.startswith(b"HTTP/1.1 101 "):  # switched: WebSocket bytes follow the head
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\nsec-websocket-protocol: v1" in head and b"bearer" not in head, head
        return 101
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(answer)
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response), answer[:200]
    body = bytearray()
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage), event
    headers = {k.lower(): v for k, v in response.headers}
    if response.status_code >= 400 and response.status_code != 426:
        assert headers[b"content-type"] == b"application/json", answer[:300]
        refusal = json.loads(body)
        assert set(refusal) == {"error", "detail"}, refusal
    return response.status_code


async def exchange(below: BelowTls, data: bytes, eof: bool) -> tuple[bytes, float]:
    """Send `data` (then EOF, if asked); the server's whole answer and how long it took."""
    stream = below.open_stream("alice")
    start = trio.current_time()
    with trio.fail_after(HEAD_DEADLINE + 60):  # never a hang: the head deadline bounds it
        try:
            await stream.send_all(data)
            if eof:
                await stream.send_eof()  # type: ignore[attr-defined]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server already answered and closed
        answer = await read_all(stream)
    await trio.aclose_forcefully(stream)
    return answer, trio.current_time() - start


# State directories on tmpfs when there is one: each example starts a server, whose key and
# state stores sync their files (~60 ms of waiting per start on a disk, ~5 ms on tmpfs).
STATE_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@asynccontextmanager
async def below_tls_server(
    pki: TestPki, tmp_path: Path, **overrides: object
) -> AsyncIterator[BelowTls]:
    """A fresh server below TLS for one example (tests/below_tls.py), shut down after it;
    history in memory unless `overrides` say otherwise.

    Not the `start_below_tls` fixture: pytest-trio sets fixtures up once per test, and
    hypothesis runs each example in a trio run of its own.
    """
    overrides.setdefault("history", "memory")
    with tempfile.TemporaryDirectory(dir=STATE_ROOT or tmp_path, prefix="fuzz-") as state:
        async with trio.open_nursery() as nursery:
            below = await start_below_tls(pki, Path(state), nursery, **overrides)
            try:
                yield below
            finally:
                below.server.shutdown()


@fuzz(30)
@given(heads=st.lists(st.tuples(request_heads(), st.booleans()), min_size=1, max_size=8))
async def test_every_request_head_is_answered(
    pki: TestPki,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    heads: list[tuple[bytes, bool]],
) -> None:
    """An HTTP response, or a close at the head deadline for a head that never completed
    (at once if the client closed before sending anything); no traceback. The connections
    run concurrently against one server."""
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="chat")
    results: list[tuple[bytes, bool, bytes, float]] = []
    async with below_tls_server(
        pki, tmp_path, handshake_timeout=HEAD_DEADLINE, connect_timeout=5
    ) as below:

        async def one(data: bytes, eof: bool) -> None:
            results.append((data, eof, *await exchange(below, data, eof)))

        async with trio.open_nursery() as nursery:
            for data, eof in heads:
                nursery.start_soon(one, data, eof)
    for data, eof, answer, took in results:
        if answer:
            event(f"status {check_answer(answer)}")
        elif eof:  # closed by the client: answered unless it had sent nothing but blank lines
            assert not data.strip(b"\r\n"), data[:200]
            assert took == 0
        else:  # the head never completed: closed at the deadline
            assert took == HEAD_DEADLINE, data[:200]
    no_traceback(caplog)


@fuzz(15)
@given(bodies=st.lists(BODIES, min_size=1, max_size=6))
async def test_token_routes_refuse_any_body_in_json(
    pki: TestPki,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    bodies: list[bytes],
) -> None:
    """POST /auth/refresh with any body: 400 (or 401 for an unknown token, 413 for a big
    body), always the JSON refusal; never a traceback."""
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="chat")
    async with below_tls_server(pki, tmp_path) as below:
        for body in bodies:
            reply = await below.http("alice", "POST", "/auth/refresh", body=body)
            event(f"refresh {reply.status} {reply.json()['error']}")
            assert reply.status in (400, 401, 413), reply
            assert set(reply.json()) == {"error", "detail"}
    no_traceback(caplog)


WS_HEADER_VARIANTS: dict[str, list[str | None]] = {
    "Host": ["chat.test", None, "", "xn--zz", "\xe9"],
    "Upgrade": ["websocket", "WebSocket", "websocket, h2c", "h2c", None],
    "Connection": ["Upgrade", "keep-alive, Upgrade", "upgrade", "close", None, "\xff Upgrade"],
    "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ==", "short", "", "!!!!", None],
    "Sec-WebSocket-Version": ["13", "8", "13, 8", "x", None],
    "Sec-WebSocket-Protocol": ["v12.stomp, bearer.{token}", "bearer.{token}, v10.stomp",
                               "bearer.{token}", "v12.stomp", None],
    "Sec-WebSocket-Extensions": [None, "permessage-deflate", "permessage-deflate; x=1",
                                 "x-unknown", ";;"],
    "Origin": [None, "https://evil.test", "null"],
}  # fmt: skip


@st.composite
def upgrade_heads(draw: st.DrawFn) -> bytes:
    """A WebSocket opening handshake with a real token (filled in when sent) and each
    header right, wrong or missing."""
    headers = []
    for name, values in WS_HEADER_VARIANTS.items():
        value = draw(st.sampled_from(values)) if draw(st.integers(0, 2)) == 0 else values[0]
        if value is not None:
            headers.append(f"{name}: {value}")
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST"]))
    target = draw(st.sampled_from(["/ws", "/ws", "/ws?x=1", "/WS"]))
    head = "\r\n".join([f"{method} {target} HTTP/1.1", *headers, "", ""]).encode()
    return draw(st.one_of(st.just(head), st.just(head), mutated(st.just(head))))


# Found by the fuzz: wsproto took these with a valid token, then raised UnicodeError (it
# decodes those headers itself) or h11's LocalProtocolError (it rebuilds the request as
# HTTP/1.1, which needs a Host): a traceback in the log and no answer. Fixed in
# upgrade.check_handshake.
UNANSWERED = [
    b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: v12.stomp, bearer.{token}\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection:\xff Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: v12.stomp, bearer.{token}\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: xn--zz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: v12.stomp, bearer.{token}, \xe9\r\n\r\n",
]


@fuzz(20)
@given(heads=st.lists(st.tuples(upgrade_heads(), st.booleans()), min_size=1, max_size=6))
@example(heads=[(head, False) for head in UNANSWERED])
async def test_every_upgrade_is_switched_or_refused_in_json(
    pki: TestPki,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    heads: list[tuple[bytes, bool]],
) -> None:
    """101, or a refusal (bad_handshake, unsupported_subprotocol, missing_token, 426 ...)
    with its JSON body; a connection that switched and sends nothing ends at the connect
    timeout; no traceback."""
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="chat")
    results: list[tuple[bytes, float]] = []
    async with below_tls_server(
        pki, tmp_path, handshake_timeout=HEAD_DEADLINE, connect_timeout=5, close_timeout=2
    ) as below:
        token = await below.token("alice")

        async def one(head: bytes, eof: bool) -> None:
            results.append(await exchange(below, head.replace(b"{token}", token.encode()), eof))

        async with trio.open_nursery() as nursery:
            for head, eof in heads:
                nursery.start_soon(one, head, eof)
    for answer, took in results:
        if answer:
            event(f"status {check_answer(answer)}")
        else:
            assert took <= HEAD_DEADLINE + 5
    no_traceback(caplog)


def head_of_length(length: int) -> bytes:
    """GET /healthz whose head (request line to the blank line, included) is `length` bytes."""
    base = b"GET /healthz HTTP/1.1\r\nHost: chat.test\r\nX-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (length - len(base)))


@fuzz(30)
@given(
    lengths=st.lists(
        st.one_of(
            st.integers(MAX_REQUEST_HEAD - 3, MAX_REQUEST_HEAD + 3),
            st.integers(100, 3 * MAX_REQUEST_HEAD),
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=4),
    body=st.sampled_from([b"", b"trailing bytes"]),
)
async def test_the_request_head_limit_is_exact(
    pki: TestPki,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    lengths: list[int],
    cuts: list[int],
    body: bytes,
) -> None:
    """A head of MAX_REQUEST_HEAD bytes is served, one byte more is 431, however it arrives
    (in pieces, with bytes after it)."""
    caplog.clear()
    async with below_tls_server(pki, tmp_path) as below:
        for length in lengths:
            stream = below.open_stream("alice")
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for chunk in split(head_of_length(length) + body, cuts):
                    await stream.send_all(chunk)  # the server may answer and close before the end
            with trio.fail_after(HEAD_DEADLINE + 5):
                answer = await read_all(stream)
            status = check_answer(answer)
            assert status == (200 if length <= MAX_REQUEST_HEAD else 431), (length, answer[:80])
    no_traceback(caplog)
