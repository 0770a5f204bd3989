"""The sans-IO StompConnection in both roles: states, sticky errors, heart-beats, receipts.

Plain bytes and explicit `now` values: no I/O, no clock. Streams are fed whole, byte by
byte and split at every position, with an unfinished frame after them.
"""

from __future__ import annotations

import dataclasses

import pytest

from chat.protocol import events
from chat.protocol.connection import (
    ConnectionLimits,
    NotConnected,
    Role,
    State,
    StompConnection,
)
from chat.protocol.errors import (
    CloseCode,
    FrameTooLarge,
    LocalProtocolError,
    MalformedFrame,
    MissingHeader,
    PolicyViolation,
    UnknownCommand,
)
from chat.protocol.stomp import Frame, Limits, encode
from tests.test_stomp import chunkings

CONNECT = Frame(
    "CONNECT", (("accept-version", "1.2"), ("host", "chat"), ("heart-beat", "1000,2000"))
)
CONNECTED = Frame(
    "CONNECTED",
    (
        ("version", "1.2"),
        ("heart-beat", "3000,500"),
        ("session", "s1"),
        ("server", "chat/0.1"),
        ("user-name", "alice"),
    ),
)


def message(n: int, subscription: str = "sub-1") -> Frame:
    return Frame(
        "MESSAGE",
        (
            ("destination", "/topic/lobby"),
            ("subscription", subscription),
            ("message-id", str(n)),
            ("content-length", "3"),
        ),
        b"m\0" + str(n % 10).encode(),
    )


def receipt(receipt_id: str) -> Frame:
    return Frame("RECEIPT", (("receipt-id", receipt_id),))


def drain(conn: StompConnection) -> list[events.Event]:
    found = []
    while (event := conn.next_event()) is not None:
        found.append(event)
    return found


def feed(conn: StompConnection, chunks: list[bytes], now: float = 0.0) -> list[events.Event]:
    found = []
    for chunk in chunks:
        conn.receive_data(chunk, now)
        found += drain(conn)
    return found


def connected_client() -> StompConnection:
    client = StompConnection(Role.CLIENT)
    client.send(CONNECT, 0.0)
    client.receive_data(encode(CONNECTED), 0.0)
    assert isinstance(client.next_event(), events.Connected)
    return client


def connected_server() -> StompConnection:
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(CONNECT), 0.0)
    assert isinstance(server.next_event(), events.Connect)
    server.send(CONNECTED, 0.0)
    return server


# ---------------------------------------------------------------- a whole session, each role

SERVER_STREAM = b"".join(
    [
        encode(CONNECTED),
        b"\n\n",  # heart-beats between frames
        encode(receipt("r-1")),
        encode(message(1)),
        b"\r\n",
        encode(message(2)),
        encode(receipt("r-2")),
    ]
)


def test_client_role_session_events() -> None:
    """The same stream whole: one typed event per frame, in order, and the states between."""
    client = StompConnection(Role.CLIENT)
    client.send(CONNECT, 0.0)
    client.receive_data(encode(CONNECTED), 0.0)
    first = client.next_event()
    assert first == events.Connected(CONNECTED, "1.2", "s1", "chat/0.1", "alice", (1000, 3000))
    assert client.state is State.CONNECTED
    client.send(
        Frame("SUBSCRIBE", (("destination", "/topic/lobby"), ("id", "sub-1"), ("receipt", "r-1"))),
        0.0,
    )
    client.send(Frame("DISCONNECT", (("receipt", "r-2"),)), 0.0)
    assert client.state is State.CLOSING
    assert client.pending_receipts == {"r-1": "SUBSCRIBE", "r-2": "DISCONNECT"}
    rest = feed(client, [SERVER_STREAM[len(encode(CONNECTED)) :]])
    assert rest == [
        events.Receipt(receipt("r-1"), "r-1", "SUBSCRIBE"),
        events.Message(message(1), "/topic/lobby", "sub-1", "1"),
        events.Message(message(2), "/topic/lobby", "sub-1", "2"),
        events.Receipt(receipt("r-2"), "r-2", "DISCONNECT"),
    ]
    assert client.state is State.CLOSED
    assert client.pending_receipts == {}


@pytest.mark.parametrize("chunks", list(chunkings(SERVER_STREAM)))
def test_client_role_any_split(chunks: list[bytes]) -> None:
    """However the stream is cut, the same events come out; a trailing partial frame waits."""
    client = StompConnection(Role.CLIENT)
    client.send(CONNECT, 0.0)
    client.receive_data(b"", 0.0)
    got: list[events.Event] = []
    asked = False
    for chunk in [*chunks, b"MESSAGE\ndestination:/topic/lobby\nsub"]:
        client.receive_data(chunk, 0.0)
        while (event := client.next_event()) is not None:
            got.append(event)
            if not asked:  # ask for the receipts the server will send, once connected
                client.send(
                    Frame(
                        "SUBSCRIBE",
                        (("destination", "/topic/lobby"), ("id", "sub-1"), ("receipt", "r-1")),
                    ),
                    0.0,
                )
                client.send(
                    Frame("SEND", (("destination", "/topic/lobby"), ("receipt", "r-2")), b"x"), 0.0
                )
                asked = True
    assert [type(event) for event in got] == [
        events.Connected,
        events.Receipt,
        events.Message,
        events.Message,
        events.Receipt,
    ]
    assert [event.frame for event in got[1:]] == [
        receipt("r-1"),
        message(1),
        message(2),
        receipt("r-2"),
    ]
    assert client.state is State.CONNECTED  # and the partial MESSAGE is still buffered
    client.receive_data(b"scription:sub-1\nmessage-id:9\n\n\0", 0.0)
    assert client.next_event() == events.Message(
        Frame(
            "MESSAGE",
            (("destination", "/topic/lobby"), ("subscription", "sub-1"), ("message-id", "9")),
        ),
        "/topic/lobby",
        "sub-1",
        "9",
    )


CLIENT_STREAM = b"".join(
    [
        encode(CONNECT),
        encode(Frame("SUBSCRIBE", (("destination", "/topic/a.*"), ("id", "0"), ("receipt", "r")))),
        b"\n",
        encode(Frame("SEND", (("destination", "/topic/a.b"), ("content-length", "2")), b"\0\0")),
        encode(Frame("UNSUBSCRIBE", (("id", "0"),))),
        encode(Frame("ACK", (("id", "x"),))),
        encode(Frame("DISCONNECT", (("receipt", "bye"),))),
    ]
)


@pytest.mark.parametrize("chunks", list(chunkings(CLIENT_STREAM)))
def test_server_role_any_split(chunks: list[bytes]) -> None:
    server = StompConnection(Role.SERVER)
    got: list[events.Event] = []
    for chunk in chunks:
        server.receive_data(chunk, 0.0)
        while (event := server.next_event()) is not None:
            got.append(event)
            if isinstance(event, events.Connect):
                server.send(CONNECTED, 0.0)
    connect, subscribe, send, unsubscribe, ack, disconnect = got
    assert connect == events.Connect(CONNECT, "1.2", "chat", (1000, 2000))
    assert subscribe == events.Subscribe(subscribe.frame, "/topic/a.*", "0", "auto")
    assert subscribe.receipt == "r"
    assert (send.frame.body, send) == (b"\0\0", events.Send(send.frame, "/topic/a.b"))
    assert unsubscribe == events.Unsubscribe(unsubscribe.frame, "0")
    assert isinstance(ack, events.Ack)
    assert isinstance(disconnect, events.Disconnect) and disconnect.receipt == "bye"
    assert server.state is State.CLOSING
    assert server.heartbeat == (3000, 1000)  # ours 3000,500 / theirs 1000,2000
    server.send(receipt("bye"), 0.0)  # the DISCONNECT's RECEIPT is the last frame
    assert server.state is State.CLOSED


def test_events_are_frozen_values() -> None:
    event = events.Send(Frame("SEND"), "/topic/a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.destination = "/topic/b"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")  # slotted


def test_version_negotiation() -> None:
    for offered, chosen in [("1.0,1.1", "1.1"), ("1.2,1.1", "1.2"), (None, "1.0")]:
        server = StompConnection(Role.SERVER)
        headers = () if offered is None else (("accept-version", offered),)
        server.receive_data(encode(Frame("STOMP", headers)), 0.0)
        event = server.next_event()
        assert isinstance(event, events.Connect) and event.version == chosen
        assert event.frame.command == "STOMP"
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(Frame("CONNECT", (("accept-version", "2.0"),))), 0.0)
    with pytest.raises(PolicyViolation, match="unsupported STOMP version") as refused:
        server.next_event()
    assert refused.value.close_code == CloseCode.POLICY


# ---------------------------------------------------------------- the state table


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (Frame("SEND", (("destination", "/topic/a"),)), NotConnected, "not connected"),
        (Frame("DISCONNECT"), NotConnected, "not connected"),
    ],
)
def test_server_refuses_frames_before_connect(frame: Frame, error: type, message: str) -> None:
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(frame), 0.0)
    with pytest.raises(error) as refused:
        server.next_event()
    assert refused.value.message == message
    assert refused.value.detail == f"expected CONNECT, got {frame.command}"
    assert refused.value.close_code == CloseCode.POLICY
    assert server.state is State.ERROR


def test_server_refuses_a_second_connect() -> None:
    server = connected_server()
    server.receive_data(encode(CONNECT), 0.0)
    with pytest.raises(MalformedFrame, match="already connected") as refused:
        server.next_event()
    assert refused.value.detail == "CONNECT may only be sent once"
    assert refused.value.close_code == CloseCode.PROTOCOL_ERROR


def test_server_must_answer_connect_before_reading_on() -> None:
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(CONNECT) + encode(Frame("DISCONNECT")), 0.0)
    assert isinstance(server.next_event(), events.Connect)
    with pytest.raises(LocalProtocolError, match="answer CONNECT"):
        server.next_event()


@pytest.mark.parametrize(
    ("sent", "stream", "said"),
    [
        ((), encode(message(1)), "unexpected MESSAGE before CONNECT"),
        ((CONNECT,), encode(message(1)), "expected CONNECTED, got MESSAGE"),
        ((CONNECT,), encode(CONNECTED) + encode(CONNECTED), "unexpected CONNECTED after CONNECTED"),
        (
            (CONNECT,),
            encode(CONNECTED) + encode(receipt("r-9")),
            "RECEIPT for 'r-9', which was never",
        ),
    ],
)
def test_client_refuses_frames_out_of_place(sent: tuple, stream: bytes, said: str) -> None:
    client = StompConnection(Role.CLIENT)
    for frame in sent:
        client.send(frame, 0.0)
    client.receive_data(stream, 0.0)
    with pytest.raises(MalformedFrame) as refused:
        drain(client)
    assert refused.value.message.startswith(said)
    assert client.state is State.ERROR


@pytest.mark.parametrize(
    ("role", "sent", "frame"),
    [
        (Role.CLIENT, (), Frame("SEND", (("destination", "/topic/a"),))),
        (Role.CLIENT, (CONNECT,), CONNECT),  # CONNECT twice
        (Role.CLIENT, (), CONNECTED),  # a server's frame
        (
            Role.SERVER,
            (),
            Frame("MESSAGE", (("destination", "/a"), ("subscription", "1"), ("message-id", "1"))),
        ),
    ],
)
def test_local_frames_out_of_place(role: Role, sent: tuple, frame: Frame) -> None:
    conn = StompConnection(role)
    for earlier in sent:
        conn.send(earlier, 0.0)
    with pytest.raises(LocalProtocolError, match=f"cannot send {frame.command} in state"):
        conn.send(frame, 0.0)
    assert conn.state is State.ERROR


def test_local_frames_need_their_headers() -> None:
    client = connected_client()
    with pytest.raises(LocalProtocolError, match="SUBSCRIBE: missing header 'id'"):
        client.send(Frame("SUBSCRIBE", (("destination", "/topic/a"),)), 0.0)


@pytest.mark.parametrize(
    ("frame", "missing"),
    [
        (Frame("SUBSCRIBE", (("id", "1"),)), "destination"),
        (Frame("SUBSCRIBE", (("destination", "/topic/a"),)), "id"),
        (Frame("SEND"), "destination"),
        (Frame("UNSUBSCRIBE"), "id"),
    ],
)
def test_server_role_required_headers(frame: Frame, missing: str) -> None:
    server = connected_server()
    server.receive_data(encode(frame), 0.0)
    with pytest.raises(MissingHeader) as refused:
        server.next_event()
    assert refused.value.message == f"missing header '{missing}'"


def test_client_role_required_headers() -> None:
    client = connected_client()
    client.receive_data(b"MESSAGE\ndestination:/topic/a\nmessage-id:1\n\n\0", 0.0)
    with pytest.raises(MissingHeader, match="subscription"):
        client.next_event()


# ---------------------------------------------------------------- sticky failure


def test_remote_error_is_sticky() -> None:
    server = connected_server()
    good = encode(Frame("SEND", (("destination", "/topic/a"),)))
    server.receive_data(good + b"BOGUS\n\n\0", 0.0)
    with pytest.raises(UnknownCommand) as first:  # the bad bytes spoil the feed they came in
        server.next_event()
    for call in (
        lambda: server.next_event(),
        lambda: server.receive_data(encode(Frame("DISCONNECT")), 1.0),
        lambda: server.send(receipt("x"), 1.0),
        lambda: server.send_heartbeat(1.0),
    ):
        with pytest.raises(UnknownCommand) as again:
            call()
        assert again.value is first.value
    # the one thing left to say: the ERROR that reports it; then nothing at all
    error = Frame("ERROR", (("message", first.value.message),), first.value.detail.encode())
    assert server.send(error, 1.0).startswith(b"ERROR\n")
    assert server.state is State.CLOSED
    with pytest.raises(UnknownCommand):
        server.send(error, 1.0)


def test_frames_before_a_bad_feed_are_delivered() -> None:
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(CONNECT), 0.0)
    assert isinstance(server.next_event(), events.Connect)
    server.send(CONNECTED, 0.0)
    server.receive_data(encode(Frame("SEND", (("destination", "/topic/a"),))), 0.0)
    server.receive_data(b"SEND\nbad header\n\n\0", 0.0)
    assert isinstance(server.next_event(), events.Send)
    with pytest.raises(MalformedFrame, match="header line without ':'"):
        server.next_event()


def test_local_error_is_sticky() -> None:
    client = StompConnection(Role.CLIENT)
    with pytest.raises(LocalProtocolError) as first:
        client.send(Frame("SEND", (("destination", "/topic/a"),)), 0.0)
    with pytest.raises(LocalProtocolError) as again:
        client.receive_data(encode(CONNECTED), 0.0)
    assert again.value is first.value
    with pytest.raises(LocalProtocolError) as again:
        client.send(CONNECT, 0.0)
    assert again.value is first.value


def test_frame_over_the_limit() -> None:
    limits = ConnectionLimits(frames=Limits(max_frame_bytes=64))
    client = StompConnection(Role.CLIENT, limits=limits)
    client.send(CONNECT, 0.0)
    client.receive_data(b"CONNECTED\n\n\0MESSAGE\n" + b"x" * 100, 0.0)
    with pytest.raises(FrameTooLarge) as refused:
        drain(client)
    assert refused.value.close_code == CloseCode.TOO_BIG


# ---------------------------------------------------------------- receipts and ERROR


def test_error_fails_the_receipt_it_names_mid_stream() -> None:
    client = connected_client()
    client.send(
        Frame("SUBSCRIBE", (("destination", "/topic/a"), ("id", "1"), ("receipt", "r-1"))), 0.0
    )
    client.send(Frame("SEND", (("destination", "/topic/bad..name"), ("receipt", "r-2"))), 0.0)
    error = Frame(
        "ERROR",
        (("message", "invalid destination"), ("receipt-id", "r-2")),
        b"not a topic\nsecond line",
    )
    stream = encode(receipt("r-1")) + encode(message(1, "1")) + encode(error) + encode(message(2))
    for chunks in chunkings(stream):
        conn = connected_client()
        conn.send(
            Frame("SUBSCRIBE", (("destination", "/topic/a"), ("id", "1"), ("receipt", "r-1"))), 0.0
        )
        conn.send(Frame("SEND", (("destination", "/topic/bad..name"), ("receipt", "r-2"))), 0.0)
        got: list[events.Event] = []
        with pytest.raises(MalformedFrame, match="unexpected MESSAGE after the session ended"):
            for chunk in chunks:
                conn.receive_data(chunk, 0.0)
                while (event := conn.next_event()) is not None:
                    got.append(event)
        assert [type(event) for event in got] == [events.Receipt, events.Message, events.Error]
        assert got[2] == events.Error(
            error, "invalid destination", "not a topic\nsecond line", "r-2", "SEND"
        )
        assert conn.pending_receipts == {}


def test_error_ends_the_session() -> None:
    client = connected_client()
    client.receive_data(encode(Frame("ERROR", (("message", "token expired"),))), 0.0)
    event = client.next_event()
    assert isinstance(event, events.Error) and event.receipt_id is None and event.failed is None
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Frame("SEND", (("destination", "/topic/a"),)), 0.0)


def test_error_instead_of_connected() -> None:
    client = StompConnection(Role.CLIENT)
    client.send(CONNECT, 0.0)
    client.receive_data(encode(Frame("ERROR", (("message", "go away"),), b"not today")), 0.0)
    assert client.next_event() == events.Error(
        Frame("ERROR", (("message", "go away"),), b"not today"), "go away", "not today", None, None
    )
    assert client.state is State.CLOSED


def test_receipt_ids_are_unique_and_bounded() -> None:
    client = connected_client()
    client.send(Frame("SEND", (("destination", "/topic/a"), ("receipt", "1"))), 0.0)
    with pytest.raises(LocalProtocolError, match="'1' is already awaited"):
        client.send(Frame("SEND", (("destination", "/topic/a"), ("receipt", "1"))), 0.0)

    client = StompConnection(Role.CLIENT, limits=ConnectionLimits(max_pending_receipts=2))
    client.send(CONNECT, 0.0)
    client.receive_data(encode(CONNECTED), 0.0)
    drain(client)
    for n in range(2):
        client.send(Frame("SEND", (("destination", "/topic/a"), ("receipt", str(n)))), 0.0)
    with pytest.raises(LocalProtocolError, match="over 2 receipts are unanswered"):
        client.send(Frame("SEND", (("destination", "/topic/a"), ("receipt", "2"))), 0.0)


def test_disconnect_without_receipt_stays_closing() -> None:
    client = connected_client()
    client.send(Frame("DISCONNECT"), 0.0)
    client.receive_data(encode(message(1)), 0.0)  # still in flight when we left
    assert isinstance(client.next_event(), events.Message)
    assert client.state is State.CLOSING


# ---------------------------------------------------------------- heart-beats


def test_heartbeat_bookkeeping() -> None:
    """Ours 1000,2000 against the server's 3000,500: we send every 1 s, expect every 3 s."""
    client = StompConnection(Role.CLIENT)
    assert client.heartbeat == (0, 0) and client.next_heartbeat() is None
    client.send(CONNECT, 10.0)
    client.receive_data(encode(CONNECTED), 10.5)
    drain(client)
    assert client.heartbeat == (1000, 3000)
    assert client.next_heartbeat() == 11.0
    assert client.silence_deadline() == 16.5  # twice 3 s after the last byte
    assert not client.peer_silent(16.4)
    assert client.peer_silent(16.5)
    assert client.send_heartbeat(11.0) == b"\n"
    assert client.next_heartbeat() == 12.0
    client.send(Frame("SEND", (("destination", "/topic/a"),)), 11.7)  # any frame counts
    assert client.next_heartbeat() == 12.7
    client.receive_data(b"\n", 14.0)  # so does a heart-beat from the peer
    assert client.silence_deadline() == 20.0 and not client.peer_silent(16.5)
    client.receive_data(b"", 19.0)  # no bytes: nothing heard
    assert client.peer_silent(20.0)


def test_heartbeats_off_when_either_side_says_zero() -> None:
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(Frame("CONNECT", (("heart-beat", "0,1000"),))), 0.0)
    drain(server)
    server.send(Frame("CONNECTED", (("version", "1.2"), ("heart-beat", "500,500"))), 0.0)
    assert server.heartbeat == (1000, 0)
    assert server.silence_deadline() is None and not server.peer_silent(1e9)
    assert server.next_heartbeat() == 1.0
    server.data_sent(0.8)  # fan-out bytes that bypassed send()
    assert server.next_heartbeat() == 1.8


def test_no_heartbeat_before_connected() -> None:
    client = StompConnection(Role.CLIENT)
    client.send(CONNECT, 0.0)
    with pytest.raises(LocalProtocolError, match="no heart-beat in state connecting"):
        client.send_heartbeat(0.0)


def test_bad_heartbeat_header_from_the_peer() -> None:
    client = StompConnection(Role.CLIENT)
    client.send(CONNECT, 0.0)
    client.receive_data(encode(Frame("CONNECTED", (("heart-beat", "soon"),))), 0.0)
    with pytest.raises(MalformedFrame, match="invalid heart-beat 'soon'"):
        client.next_event()


def test_the_frame_that_broke_the_protocol_is_named() -> None:
    """Its receipt goes into the ERROR that reports it; unparseable bytes name no frame."""
    server = connected_server()
    bad = Frame("SUBSCRIBE", (("destination", "/topic/a"), ("receipt", "r-7")))
    server.receive_data(encode(bad), 0.0)
    with pytest.raises(MissingHeader):
        server.next_event()
    assert server.failed_frame == bad
    server = connected_server()
    server.receive_data(b"BOGUS\n\n\0", 0.0)
    with pytest.raises(UnknownCommand):
        server.next_event()
    assert server.failed_frame is None


def test_ack_mode_as_sent() -> None:
    server = connected_server()
    server.receive_data(encode(Frame("SUBSCRIBE", (("destination", "/a"), ("id", "1")))), 0.0)
    server.receive_data(
        encode(Frame("SUBSCRIBE", (("destination", "/a"), ("id", "2"), ("ack", "")))), 0.0
    )
    assert [event.ack for event in drain(server)] == ["auto", ""]  # type: ignore[attr-defined]


def test_queued_frames_count_once_written() -> None:
    """A server queues its frames: `send()` without `now`, then `data_sent()` when written."""
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(CONNECT), 0.0)
    drain(server)
    server.send(CONNECTED)  # ours 3000,500 against 1000,2000: send every 3 s, expect every 1 s
    assert server.heartbeat == (3000, 1000)
    assert server.next_heartbeat() is None  # nothing written yet: the CONNECTED is due first
    server.data_sent(2.0)
    assert server.next_heartbeat() == 5.0
    assert server.silence_deadline() == 2.0
    server.data_received(4.0)  # a WebSocket ping: the peer is alive
    assert server.silence_deadline() == 6.0


def test_next_deadline_is_the_first_heartbeat_event() -> None:
    """What a shell sleeps until: our heart-beat or the peer's silence deadline, whichever is
    first; before anything is written, ours no sooner than one interval from now."""
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(CONNECT), 0.0)
    drain(server)
    assert server.next_deadline(0.0) is None  # nothing agreed yet
    server.send(CONNECTED)  # send every 3 s, expect every 1 s: silent at 2 s
    assert server.next_deadline(0.5) == 2.0  # the CONNECTED is still queued: 3.5 is later
    server.data_received(1.9)
    assert server.next_deadline(1.9) == 3.9  # silent then; ours 4.9 at the earliest
    server.data_sent(0.5)
    assert server.next_deadline(1.9) == 3.5  # the CONNECTED left at 0.5: ours at 3.5


def test_no_heartbeats_no_deadline() -> None:
    server = StompConnection(Role.SERVER)
    server.receive_data(encode(Frame("CONNECT", (("accept-version", "1.2"),))), 0.0)
    drain(server)
    server.send(CONNECTED)
    server.data_sent(0.0)
    assert server.heartbeat == (0, 0) and server.next_deadline(0.0) is None


def test_withheld_bytes_count_as_heard_when_taken() -> None:
    """A server throttling its peer leaves its bytes unread: no silence until it reads again."""
    server = connected_server()
    server.data_received(1.0)
    assert server.silence_deadline() == 3.0  # expects a beat every 1 s: silent after 2 s
    server.data_withheld(10.0)  # the reader waits until 10 s before taking more
    assert server.silence_deadline() == 12.0
    server.data_withheld(5.0)  # never earlier than already heard
    assert server.silence_deadline() == 12.0
