"""The server's policy as plain values: StompSession, Broker and Durability, no network.

A session is driven with typed events (what the connection's StompConnection would hand it)
and answers into a recording outbox; the broker and durability are the real ones over a real
`History` (in memory, or SQLite in tmp_path where durability matters). Errors are checked by
their message and close code, not just that something raised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from chat.history import History
from chat.protocol import events
from chat.protocol.errors import CloseCode, StompProtocolError
from chat.protocol.policy import DEFAULT_POLICY, Policy
from chat.protocol.stomp import SERVER_COMMANDS, Frame, FrameParser
from chat.protocol.tokens import Claims, TokenAuthority
from chat.protocol.topics import TOPIC, Route, parse_route
from chat.server.broker import Broker, Published, Subscription
from chat.server.durability import Durability
from chat.server.presence import Presence
from chat.server.session import SessionLimits, Shared, StompSession
from tests.below_tls import InlineLane

NOW = 1_800_000_000.0
LOBBY = Route(TOPIC, ("lobby",))
X5T = "alice-thumbprint"


class RecordingOutbox:
    """What the session and the broker push, as WebSocket frames; never full."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.pending = 0
        self.pushed: list[bytes] = []

    def push(self, data: bytes) -> None:
        self.pushed.append(data)

    def frames(self) -> list[Frame]:
        """Every STOMP frame pushed so far, parsed back (heart-beats dropped)."""
        parser = FrameParser(commands=SERVER_COMMANDS)
        data_frames = [data for data in self.pushed if data[0] in (0x81, 0x82)]  # FIN + text/binary
        return [frame for data in data_frames for frame in parser.feed(_payload(data))]


def _payload(ws_frame: bytes) -> bytes:
    """The payload of an unmasked server-to-client WebSocket frame (RFC 6455 §5.2)."""
    length = ws_frame[1] & 0x7F
    return ws_frame[{126: 4, 127: 10}.get(length, 2) :]


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Room:
    """One broker over a memory history, and sessions on it sharing one clock."""

    def __init__(
        self,
        authority: TokenAuthority,
        history: History | None = None,
        policy: str = DEFAULT_POLICY,
    ) -> None:
        self.clock = Clock()
        self.history = history or History.memory()
        self.durability = Durability(self.history, InlineLane())
        self.broker = Broker(self.history, self.durability, self.clock)
        self.presence = Presence()
        self.policy = Policy.parse(policy, "acl.toml")  # a test may swap it: a live change
        self.authority = authority
        self.revoked: set[str] = set()  # jtis

    def session(
        self, sub: str = "alice", max_subscriptions: int = 4, exp: float = NOW + 60
    ) -> tuple[StompSession, RecordingOutbox]:
        outbox = RecordingOutbox()
        claims = Claims("chat", sub, int(NOW), int(NOW), int(exp), f"jti-{sub}", X5T)
        shared = Shared(
            self.broker,
            self.presence,
            lambda: self.policy,
            self.authority,
            lambda claims: claims.jti in self.revoked,
            self.clock,
            SessionLimits(max_subscriptions, (0, 0)),
        )
        session = StompSession(outbox, claims, shared)
        return session, outbox


@pytest.fixture
def room(authority: TokenAuthority) -> Room:
    return Room(authority)


def frame(command: str, **headers: str) -> Frame:
    return Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


def subscribe(destination: str, sub_id: str, ack: str = "auto", **headers: str) -> events.Subscribe:
    f = frame("SUBSCRIBE", destination=destination, id=sub_id, ack=ack, **headers)
    return events.Subscribe(f, destination, sub_id, ack)


def send(destination: str, body: bytes = b"hi", **headers: str) -> events.Send:
    f = Frame("SEND", (("destination", destination), *headers.items()), body)
    return events.Send(f, destination)


def refused(
    call: Callable[[], object], message: str, code: CloseCode = CloseCode.POLICY
) -> StompProtocolError:
    with pytest.raises(StompProtocolError) as info:
        call()
    assert (info.value.message, info.value.close_code) == (message, code)
    return info.value


# ---------------------------------------------------------------- StompSession: limits, refusals


def test_connected_names_the_identity_and_the_offer(room: Room) -> None:
    session, _ = room.session()
    connect = events.Connect(frame("CONNECT"), "1.2", "chat", (0, 0))
    reply = session.handle(connect).reply
    assert reply is not None and reply.command == "CONNECTED"
    assert reply.get("user-name") == "alice"
    assert reply.get("version") == "1.2"
    assert reply.get("heart-beat") == "0,0"


def test_subscription_limit(room: Room) -> None:
    session, _ = room.session(max_subscriptions=2)
    session.handle(subscribe("/topic/a", "1"))
    session.handle(subscribe("/topic/b.*", "2"))
    refused(lambda: session.handle(subscribe("/topic/c", "3")), "too many subscriptions")


def test_an_unsubscribe_frees_a_place(room: Room) -> None:
    session, _ = room.session(max_subscriptions=1)
    session.handle(subscribe("/topic/a", "1"))
    session.handle(events.Unsubscribe(frame("UNSUBSCRIBE", id="1"), "1"))
    session.handle(subscribe("/topic/b", "2"))
    assert len(room.broker) == 1


def test_duplicate_and_unknown_subscription_ids(room: Room) -> None:
    session, _ = room.session()
    session.handle(subscribe("/topic/a", "1"))
    refused(lambda: session.handle(subscribe("/topic/b", "1")), "duplicate subscription id")
    unknown = events.Unsubscribe(frame("UNSUBSCRIBE", id="9"), "9")
    refused(lambda: session.handle(unknown), "unknown subscription")


@pytest.mark.parametrize("ack", ["client", "client-individual"])
def test_only_ack_auto(room: Room, ack: str) -> None:
    session, _ = room.session()
    refused(lambda: session.handle(subscribe("/topic/a", "1", ack=ack)), "unsupported ack mode")
    assert len(room.broker) == 0


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (events.Ack(frame("ACK", id="1")), "ACK not supported"),
        (events.Nack(frame("NACK", id="1")), "NACK not supported"),
        (events.Begin(frame("BEGIN", transaction="t")), "BEGIN not supported"),
        (events.Commit(frame("COMMIT", transaction="t")), "COMMIT not supported"),
        (events.Abort(frame("ABORT", transaction="t")), "ABORT not supported"),
    ],
)
def test_acks_and_transactions_are_refused(room: Room, event: events.Event, message: str) -> None:
    session, _ = room.session()
    refused(lambda: session.handle(event), message)


@pytest.mark.parametrize(
    ("headers", "message", "code"),
    [
        (
            {"since-offset": "1", "last": "1"},
            "since-offset and last together",
            CloseCode.PROTOCOL_ERROR,
        ),
        ({"since-offset": "-1"}, "invalid since-offset", CloseCode.PROTOCOL_ERROR),
        ({"since-offset": "²"}, "invalid since-offset", CloseCode.PROTOCOL_ERROR),
        ({"last": "1" * 19}, "invalid last", CloseCode.PROTOCOL_ERROR),
        ({"last": ""}, "invalid last", CloseCode.PROTOCOL_ERROR),
    ],
)
def test_history_headers_are_validated(
    room: Room, headers: dict[str, str], message: str, code: CloseCode
) -> None:
    session, _ = room.session()
    f = Frame("SUBSCRIBE", (("destination", "/topic/a"), ("id", "1"), *headers.items()))
    refused(lambda: session.handle(events.Subscribe(f, "/topic/a", "1", "auto")), message, code)


@pytest.mark.parametrize("name", ["since-offset", "last"])
def test_history_needs_an_exact_topic(room: Room, name: str) -> None:
    session, _ = room.session()
    f = Frame("SUBSCRIBE", (("destination", "/topic/a.*"), ("id", "1"), (name, "0")))
    event = events.Subscribe(f, "/topic/a.*", "1", "auto")
    refused(lambda: session.handle(event), f"{name} needs an exact topic")


def test_last_replays_the_latest_committed_messages(room: Room) -> None:
    alice, _ = room.session("alice")
    for n in range(5):
        alice.handle(send("/topic/a", f"m{n}".encode()))
    bob, outbox = room.session("bob")
    acted = bob.handle(subscribe("/topic/a", "s", last="2"))
    assert [f.body for f in outbox.frames()] == [b"m3", b"m4"]
    assert dict(acted.receipt_headers)["offset"] == "5"
    alice.handle(send("/topic/a", b"live"))  # replay done: bob is live, nothing doubled
    assert [f.body for f in outbox.frames()] == [b"m3", b"m4", b"live"]


def test_since_offset_resumes_after_the_offset_seen(room: Room) -> None:
    alice, _ = room.session("alice")
    for n in range(1, 4):
        alice.handle(send("/topic/a", f"m{n}".encode()))
    epoch = room.history.epoch("/topic/a")
    bob, outbox = room.session("bob")
    acted = bob.handle(subscribe("/topic/a", "s", since_offset="1", epoch=epoch))
    assert [(f.get("offset"), f.body) for f in outbox.frames()] == [("2", b"m2"), ("3", b"m3")]
    assert dict(acted.receipt_headers)["recovered"] == "true"


# ---------------------------------------------------------------- StompSession: authorization


def test_authorization_lasts_until_exp(room: Room) -> None:
    session, _ = room.session(exp=NOW + 60)
    room.clock.now = NOW + 59.999
    session.check_authorization()
    room.clock.now = NOW + 60
    refused(session.check_authorization, "token expired")


def test_a_revoked_token_loses_authorization(room: Room) -> None:
    session, _ = room.session()
    session.check_authorization()
    room.revoked.add("jti-alice")
    refused(session.check_authorization, "token revoked")


def test_renewal_extends_authorization(room: Room, authority: TokenAuthority) -> None:
    session, _ = room.session(exp=NOW + 60)
    room.clock.now = NOW + 30
    token, claims = authority.issue("alice", X5T, room.clock.now)
    session.handle(send("/session/token", token.encode()))
    assert session.claims == claims
    room.clock.now = NOW + 89
    session.check_authorization()


@pytest.mark.parametrize(
    ("issued", "detail"),
    [
        (("bob", X5T, NOW), "token_cert_mismatch"),  # another identity
        (("alice", "other-cert", NOW), "token_cert_mismatch"),  # another certificate
        (("alice", X5T, NOW - 61), "token_expired"),
    ],
)
def test_renewal_refusals(
    room: Room, authority: TokenAuthority, issued: tuple[str, str, float], detail: str
) -> None:
    session, _ = room.session()
    token, _ = authority.issue(*issued)
    error = refused(
        lambda: session.handle(send("/session/token", token.encode())), "token renewal refused"
    )
    assert error.detail.startswith(detail), error.detail


def test_renewal_with_a_revoked_token_is_refused(room: Room, authority: TokenAuthority) -> None:
    session, _ = room.session()
    token, claims = authority.issue("alice", X5T, NOW)
    room.revoked.add(claims.jti)
    error = refused(
        lambda: session.handle(send("/session/token", token.encode())), "token renewal refused"
    )
    assert error.detail.startswith("token_revoked")


def test_renewal_never_moves_the_expiry_back(room: Room, authority: TokenAuthority) -> None:
    """A valid token that expires before the current one is refused: renewing with an older
    token must not shorten (or, replayed later, undo) the authorization (issue 11)."""
    session, _ = room.session(exp=NOW + 120)
    older, _ = authority.issue("alice", X5T, NOW)  # expires at NOW + 60
    error = refused(
        lambda: session.handle(send("/session/token", older.encode())), "token renewal refused"
    )
    assert "before the current one" in error.detail
    assert session.claims.exp == NOW + 120


@pytest.mark.parametrize("body", [b"not a token", b"\xff\xfe"])
def test_renewal_with_garbage_is_refused(room: Room, body: bytes) -> None:
    session, _ = room.session()
    refused(lambda: session.handle(send("/session/token", body)), "token renewal refused")


# ---------------------------------------------------------------- Broker: fan-out


def test_fan_out_reaches_every_matching_subscription_once(room: Room) -> None:
    subscribers = {name: RecordingOutbox() for name in ("exact", "star", "hash", "other")}
    patterns = {
        "exact": "/topic/chat.dev",
        "star": "/topic/chat.*",
        "hash": "/topic/#",
        "other": "/topic/other",
    }
    for name, pattern in patterns.items():
        room.broker.subscribe(
            parse_route(pattern, wildcards=True), Subscription(subscribers[name], name)
        )
    route = parse_route("/topic/chat.dev", wildcards=False)
    room.broker.publish(Published("/topic/chat.dev", route, "alice", "text/plain", b"x"))
    got = {name: [f.get("subscription") for f in o.frames()] for name, o in subscribers.items()}
    assert got == {"exact": ["exact"], "star": ["star"], "hash": ["hash"], "other": []}


def test_one_frame_per_distinct_subscription_id(room: Room) -> None:
    """Recipients reusing an id share one bytes object; another id gets its own frame."""
    outboxes = [RecordingOutbox() for _ in range(3)]
    for outbox, sub_id in zip(outboxes, ["0", "0", "1"], strict=True):
        room.broker.subscribe(LOBBY, Subscription(outbox, sub_id))
    room.broker.publish(Published("/topic/lobby", LOBBY, "alice", "text/plain", b"x"))
    first, second, third = (outbox.pushed[0] for outbox in outboxes)
    assert first is second
    assert third is not first
    assert third.replace(b"subscription:1", b"subscription:0") == first


def test_message_headers_are_the_servers(room: Room) -> None:
    outbox = RecordingOutbox()
    room.broker.subscribe(LOBBY, Subscription(outbox, "s"))
    room.clock.now = NOW + 1.5
    published = Published(
        "/topic/lobby", LOBBY, "alice", "text/plain", b"hello", (("x-custom", "kept"),)
    )
    room.broker.publish(published)
    (message,) = outbox.frames()
    assert message.get("timestamp") == str(int((NOW + 1.5) * 1000))  # the server's clock
    assert message.get("sender") == "alice"
    assert message.get("offset") == "1"
    assert message.get("content-length") == "5"
    assert message.get("x-custom") == "kept"


def test_unsubscribed_gets_nothing(room: Room) -> None:
    outbox = RecordingOutbox()
    subscription = Subscription(outbox, "s")
    room.broker.subscribe(LOBBY, subscription)
    room.broker.unsubscribe(LOBBY, subscription)
    room.broker.publish(Published("/topic/lobby", LOBBY, "alice", "text/plain", b"x"))
    assert outbox.pushed == []


# ---------------------------------------------------------------- Durability: receipts


async def test_receipts_wait_for_the_commit_and_leave_in_order(
    authority: TokenAuthority, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With SQLite, nothing is delivered or receipted before the group commit; then the
    MESSAGE and both RECEIPTs go out, the SUBSCRIBE's (which needs less) not overtaking the
    SEND's."""
    history = History.open_sqlite(tmp_path / "history.db")
    room = Room(authority, history)
    alice, outbox = room.session()
    minted = alice.handle(subscribe("/topic/old", "o"))  # mints the epoch of /topic/old
    alice.receipt(b"R0", minted.durable_seq)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(room.durability.run)
        await trio.testing.wait_all_tasks_blocked()
        assert outbox.pushed == [b"R0"]  # the epoch is on disk

        alice.handle(subscribe("/topic/lobby", "s"))
        await trio.testing.wait_all_tasks_blocked()
        sent = alice.handle(send("/topic/lobby", b"x"))
        alice.receipt(b"R1", sent.durable_seq)
        acted = alice.handle(subscribe("/topic/old", "o2"))
        assert acted.durable_seq < sent.durable_seq
        alice.receipt(b"R2", acted.durable_seq)
        assert outbox.pushed[1:] == []  # nothing before the commit
        await trio.testing.wait_all_tasks_blocked()
        assert history.committed_seq >= sent.durable_seq
        message, *receipts = outbox.pushed[1:]
        assert [f.body for f in outbox.frames()] == [b"x"]  # `message`
        assert receipts == [b"R1", b"R2"]
        nursery.cancel_scope.cancel()
    history.close()


def test_a_memory_history_releases_at_once(room: Room) -> None:
    released: list[int] = []
    room.durability.after(0, lambda: released.append(0))
    stored = room.history.append("/topic/a", "alice", "text/plain", b"x", (), 0)
    room.durability.after(stored.seq, lambda: released.append(stored.seq))
    assert released == [0, stored.seq]
