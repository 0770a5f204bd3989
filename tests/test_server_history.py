"""Offsets, epochs, resume and durability (PROTOCOL.md §8) against a real server."""

from __future__ import annotations

import signal

import pytest
import trio
from trio_websocket import ConnectionClosed

from chat import pki as pki_module
from chat.protocol.stomp import Frame, encode
from chat.server.app import ChatServer
from tests.conftest import RunningServer, StompPeer, TestPki, raw_ws, stomp_peer
from tests.test_server_cli import start as start_subprocess


async def publish(peer: StompPeer, destination: str, bodies: list[bytes]) -> list[Frame]:
    """Send each body with a receipt; returns MESSAGEs the sender itself got meanwhile."""
    own: list[Frame] = []
    for n, body in enumerate(bodies):
        await peer.send("SEND", {"destination": destination, "receipt": f"p{n}"}, body)
        own += await messages_until_receipt(peer, f"p{n}")
    return own


async def subscribe(peer: StompPeer, destination: str, sub_id: str = "s", **extra: str) -> Frame:
    await peer.send(
        "SUBSCRIBE", {"destination": destination, "id": sub_id, "receipt": "sub", **extra}
    )
    return await peer.receive()


async def messages_until_receipt(peer: StompPeer, receipt_id: str) -> list[Frame]:
    got = []
    while (frame := await peer.receive()).command == "MESSAGE":
        got.append(frame)
    assert frame.get("receipt-id") == receipt_id, frame
    return got


async def test_offsets_count_per_topic_and_epoch_is_stable(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "bob") as bob, stomp_peer(server, pki, "alice") as alice:
        await subscribe(bob, "/topic/h.#")
        await publish(alice, "/topic/h.a", [b"1", b"2"])
        await publish(alice, "/topic/h.b", [b"x"])
        await publish(alice, "/topic/h.a", [b"3"])
        got = [await bob.receive() for _ in range(4)]
    assert [(f.get("destination"), f.get("offset")) for f in got] == [
        ("/topic/h.a", "1"),
        ("/topic/h.a", "2"),
        ("/topic/h.b", "1"),
        ("/topic/h.a", "3"),
    ]
    epochs = {f.get("destination"): f.get("epoch") for f in got}
    assert got[0].get("epoch") == got[3].get("epoch") == epochs["/topic/h.a"]
    assert all(f.get("message-id") for f in got)


async def test_resume_replays_missed_messages_then_goes_live(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        async with stomp_peer(server, pki, "bob") as bob:
            await subscribe(bob, "/topic/room")
            await publish(alice, "/topic/room", [b"m1", b"m2"])
            seen = [await bob.receive() for _ in range(2)]
        epoch, last = seen[-1].get("epoch"), seen[-1].get("offset")
        await publish(alice, "/topic/room", [b"m3", b"m4", b"m5"])
        async with stomp_peer(server, pki, "bob") as bob:
            await bob.send(
                "SUBSCRIBE",
                {
                    "destination": "/topic/room",
                    "id": "s",
                    "since-offset": last,
                    "epoch": epoch,
                    "receipt": "r",
                },
            )
            replayed = await messages_until_receipt(bob, "r")
            await publish(alice, "/topic/room", [b"m6"])
            live = await bob.receive()
    assert [f.body for f in replayed] == [b"m3", b"m4", b"m5"]
    assert [f.get("offset") for f in replayed] == ["3", "4", "5"]
    assert (live.body, live.get("offset")) == (b"m6", "6")


async def test_subscribe_receipt_says_recovered(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await publish(alice, "/topic/r", [b"a"])
        plain = await subscribe(alice, "/topic/r")  # no since-offset: no replay, no verdict
        assert (plain.command, plain.get("recovered")) == ("RECEIPT", None)
        await alice.send(
            "SUBSCRIBE",
            {"destination": "/topic/r", "id": "2", "since-offset": "0", "receipt": "again"},
        )
        replayed = await messages_until_receipt(alice, "again")
    assert [f.body for f in replayed] == [b"a"]


async def test_resume_while_publishing_continues_has_no_gap_or_duplicate(server, pki) -> None:
    total = 200
    async with stomp_peer(server, pki, "alice") as alice, stomp_peer(server, pki, "bob") as bob:
        await subscribe(bob, "/topic/busy", "first")
        published = 0
        while_away = trio.Event()  # set once 20 more are sent after bob unsubscribed
        away_until: float = total

        async def publisher() -> None:
            nonlocal published
            for n in range(total):
                await alice.send("SEND", {"destination": "/topic/busy"}, str(n).encode())
                published = n + 1
                if published >= away_until:
                    while_away.set()
                if n % 20 == 0:
                    await trio.lowlevel.checkpoint()  # let bob's side run between bursts

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            first = [await bob.receive() for _ in range(30)]
            await bob.send("UNSUBSCRIBE", {"id": "first"})
            away_until = min(published + 20, total)
            with trio.fail_after(10):
                await while_away.wait()  # publishing goes on while bob is away
            last = first[-1]
            await bob.send(
                "SUBSCRIBE",
                {
                    "destination": "/topic/busy",
                    "id": "second",
                    "since-offset": last.get("offset"),
                    "epoch": last.get("epoch"),
                },
            )
            rest: list[Frame] = []
            with trio.fail_after(10):
                while len(rest) < total - 30:
                    frame = await bob.receive()
                    if frame.get("subscription") == "second":
                        rest.append(frame)
    offsets = [int(f.get("offset")) for f in first + rest]
    assert offsets == list(range(1, total + 1))


async def test_subscribe_receipt_says_where_an_exact_subscription_starts(server, pki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        quiet = await subscribe(alice, "/topic/quiet", "q")
        await publish(alice, "/topic/busy2", [b"1", b"2"])
        busy = await subscribe(alice, "/topic/busy2", "b")
        wildcard = await subscribe(alice, "/topic/busy2.*", "w")
    assert quiet.get("offset") == "0" and quiet.get("epoch")
    assert busy.get("offset") == "2" and busy.get("epoch") != quiet.get("epoch")
    assert (wildcard.get("offset"), wildcard.get("epoch")) == (None, None)


async def test_epoch_mismatch_is_not_recovered_but_delivers_what_is_kept(server, pki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await publish(alice, "/topic/e", [b"a", b"b"])
        await alice.send(
            "SUBSCRIBE",
            {
                "destination": "/topic/e",
                "id": "s",
                "since-offset": "1",
                "epoch": "not-the-epoch",
                "receipt": "r",
            },
        )
        got = []
        while (frame := await alice.receive()).command == "MESSAGE":
            got.append(frame.body)
    assert got == [b"a", b"b"]
    assert frame.get("recovered") == "false"


async def test_messages_no_longer_retained_is_not_recovered(start_server, pki) -> None:
    server = await start_server(retention_count=3)
    async with stomp_peer(server, pki, "alice") as alice:
        await publish(alice, "/topic/short", [b"1", b"2", b"3", b"4", b"5"])
        await subscribe(alice, "/topic/short", "probe")
        (own,) = await publish(alice, "/topic/short", [b"6"])
        epoch = own.get("epoch")
        await alice.send(
            "SUBSCRIBE",
            {
                "destination": "/topic/short",
                "id": "s",
                "since-offset": "1",
                "epoch": epoch,
                "receipt": "r",
            },
        )
        got = []
        while (frame := await alice.receive()).command == "MESSAGE":
            got.append(frame.body)
    assert got == [b"4", b"5", b"6"]
    assert frame.get("recovered") == "false"


async def test_since_offset_on_wildcard_is_an_error(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send("SUBSCRIBE", {"destination": "/topic/a.*", "id": "s", "since-offset": "0"})
        frame = await alice.receive()
    assert (frame.command, frame.get("message")) == ("ERROR", "since-offset needs an exact topic")


async def test_clean_restart_keeps_history_offsets_and_epoch(start_server, pki, tmp_path) -> None:
    state = tmp_path / "kept"
    first = await start_server(state_dir=state)
    async with stomp_peer(first, pki, "alice") as alice:
        await subscribe(alice, "/topic/keep")
        own = await publish(alice, "/topic/keep", [b"before-1", b"before-2"])
        epoch = own[0].get("epoch")
    await first.stop()
    second = await start_server(state_dir=state)
    async with stomp_peer(second, pki, "alice") as alice:
        await alice.send(
            "SUBSCRIBE",
            {
                "destination": "/topic/keep",
                "id": "s",
                "since-offset": "0",
                "epoch": epoch,
                "receipt": "r",
            },
        )
        replayed = await messages_until_receipt(alice, "r")
        (live,) = await publish(alice, "/topic/keep", [b"after"])  # through subscription "s"
    assert [f.body for f in replayed] == [b"before-1", b"before-2"]
    assert (live.get("offset"), live.get("epoch")) == ("3", epoch)


async def test_memory_history_restart_changes_epoch(start_server, pki, tmp_path) -> None:
    state = tmp_path / "mem"
    first = await start_server(state_dir=state, history="memory")
    async with stomp_peer(first, pki, "alice") as alice:
        await subscribe(alice, "/topic/m")
        (own,) = await publish(alice, "/topic/m", [b"gone"])
        epoch = own.get("epoch")
    await first.stop()
    second = await start_server(state_dir=state, history="memory")
    async with stomp_peer(second, pki, "alice") as alice:
        receipt = await subscribe(alice, "/topic/m")
        await alice.send(
            "SUBSCRIBE",
            {
                "destination": "/topic/m",
                "id": "t",
                "since-offset": "1",
                "epoch": epoch,
                "receipt": "r",
            },
        )
        assert (await alice.receive()).get("recovered") == "false"
    assert receipt.command == "RECEIPT"


async def test_receipted_messages_survive_sigkill(tmp_path) -> None:
    process, port, _ = await start_subprocess(tmp_path)
    certs = pki_module.DevPki.at(tmp_path / "certs")
    pki = TestPki(certs.directory, certs.ca, certs.directory)
    running = RunningServer(ChatServer.__new__(ChatServer), port)
    bodies = [f"durable-{n}".encode() for n in range(50)]
    async with raw_ws(running, pki, "alice") as ws:
        alice = StompPeer(ws)
        await alice.connect()
        await publish(alice, "/topic/crash", bodies)  # every one receipted
        process.send_signal(signal.SIGKILL)
        await process.wait()
    process, port, _ = await start_subprocess(tmp_path)
    try:
        running = RunningServer(ChatServer.__new__(ChatServer), port)
        async with raw_ws(running, pki, "alice") as ws:
            alice = StompPeer(ws)
            await alice.connect()
            await alice.send(
                "SUBSCRIBE",
                {"destination": "/topic/crash", "id": "s", "since-offset": "0", "receipt": "r"},
            )
            replayed = await messages_until_receipt(alice, "r")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await process.wait()
    assert [f.body for f in replayed] == bodies
    assert [f.get("offset") for f in replayed] == [str(n) for n in range(1, 51)]


async def test_quiet_room_keeps_its_epoch_across_a_crash(tmp_path) -> None:
    """The SUBSCRIBE RECEIPT waits until a new topic's epoch is on disk: a SIGKILL keeps it."""
    process, port, _ = await start_subprocess(tmp_path)
    certs = pki_module.DevPki.at(tmp_path / "certs")
    pki = TestPki(certs.directory, certs.ca, certs.directory)
    async with raw_ws(RunningServer(ChatServer.__new__(ChatServer), port), pki, "alice") as ws:
        alice = StompPeer(ws)
        await alice.connect()
        quiet = await subscribe(alice, "/topic/quiet")
        process.send_signal(signal.SIGKILL)
        await process.wait()
    process, port, _ = await start_subprocess(tmp_path)
    try:
        async with raw_ws(RunningServer(ChatServer.__new__(ChatServer), port), pki, "alice") as ws:
            alice = StompPeer(ws)
            await alice.connect()
            resume = {"since-offset": quiet.get("offset"), "epoch": quiet.get("epoch")}
            resumed = await subscribe(alice, "/topic/quiet", **resume)
            (after,) = await publish(alice, "/topic/quiet", [b"after"])
            (marker,) = await publish(alice, "/topic/quiet", [b"marker"])  # nothing in between
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await process.wait()
    assert (quiet.get("offset"), resumed.get("recovered")) == ("0", "true")
    assert resumed.get("epoch") == quiet.get("epoch")
    assert (after.body, after.get("offset")) == (b"after", "1")
    assert after.get("epoch") == quiet.get("epoch")
    assert (marker.body, marker.get("offset")) == (b"marker", "2")


@pytest.mark.parametrize("header", ["since-offset", "last"])
@pytest.mark.parametrize(
    "bad",
    ["-1", "x", "1.5", "", " 1", "+1", "\u00b2", "\u0663", "1" * 19, "9" * 5000],
    ids=[
        "negative",
        "word",
        "decimal",
        "empty",
        "space",
        "plus",
        "superscript",
        "arabic-indic",
        "19-digits",
        "5000-digits",
    ],
)
async def test_invalid_replay_count(server, pki: TestPki, header: str, bad: str) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send("SUBSCRIBE", {"destination": "/topic/a", "id": "s", header: bad})
        await closed_with(alice, f"invalid {header}", 1002)


async def test_longest_replay_count_is_accepted(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        receipt = await subscribe(alice, "/topic/a", last="9" * 18)
        ahead = await subscribe(alice, "/topic/a", "t", **{"since-offset": "9" * 18})
    assert (receipt.command, receipt.get("offset")) == ("RECEIPT", "0")
    assert (ahead.command, ahead.get("recovered")) == ("RECEIPT", "false")


# ---------------------------------------------------------------- paged replay (PROTOCOL.md §11)

BACKLOG = 60  # messages of BODY_BYTES: about 480 KiB, many times SMALL_BUFFER
BODY_BYTES = 8000
SMALL_BUFFER = {"outbound_buffer_bytes": 64 * 1024, "max_frame_bytes": 16 * 1024}


def backlog_bodies(count: int = BACKLOG) -> list[bytes]:
    return [f"{n:04}".encode() * (BODY_BYTES // 4) for n in range(1, count + 1)]


async def publish_pipelined(peer: StompPeer, destination: str, bodies: list[bytes]) -> None:
    """SEND them all at once; the last one's RECEIPT means every one is stored (in order)."""
    for n, body in enumerate(bodies):
        headers = {"destination": destination}
        if n == len(bodies) - 1:
            headers["receipt"] = "pipelined"
        await peer.send("SEND", headers, body)
    assert await messages_until_receipt(peer, "pipelined") == []


async def send_together(peer: StompPeer, *frames: Frame) -> None:
    """Several STOMP frames in one WebSocket message: the server handles them in one step."""
    await peer.ws.send_message(b"".join(encode(frame) for frame in frames).decode())


def frame(command: str, **headers: str) -> Frame:
    return Frame(command, tuple((name.replace("_", "-"), v) for name, v in headers.items()))


async def closed_with(peer: StompPeer, message: str, code: int) -> list[Frame]:
    """The frames up to an ERROR with `message`; then the server closes with `code`."""
    frames = []
    while (got := await peer.receive()).command != "ERROR":
        frames.append(got)
    assert got.get("message") == message, got
    with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
        while True:
            await peer.ws.get_message()
    assert closed.value.reason.code == code
    return frames


async def replay_and_receipt(peer: StompPeer, count: int) -> tuple[list[Frame], Frame]:
    """`count` MESSAGEs and the SUBSCRIBE's RECEIPT, which may come after the first chunk."""
    frames = [await peer.receive() for _ in range(count + 1)]
    (receipt,) = [f for f in frames if f.command == "RECEIPT"]
    return [f for f in frames if f.command == "MESSAGE"], receipt


def offsets(frames: list[Frame]) -> list[int]:
    return [int(f.get("offset")) for f in frames if f.command == "MESSAGE"]


@pytest.mark.parametrize("asked", [{"since-offset": "0"}, {"last": "1000"}], ids=["resume", "last"])
async def test_replay_larger_than_the_outbound_buffer_completes(
    start_server, pki: TestPki, asked: dict[str, str]
) -> None:
    server = await start_server(**SMALL_BUFFER)
    bodies = backlog_bodies()
    assert sum(map(len, bodies)) > 4 * server.config.outbound_buffer_bytes
    async with stomp_peer(server, pki, "alice") as alice, stomp_peer(server, pki, "bob") as bob:
        await publish_pipelined(alice, "/topic/big", bodies)
        headers = {"destination": "/topic/big", "id": "s", "receipt": "r", **asked}
        await bob.send("SUBSCRIBE", headers)
        replayed, receipt = await replay_and_receipt(bob, BACKLOG)
        await publish(alice, "/topic/big", [b"live"])
        live = await bob.receive()
    assert (receipt.get("receipt-id"), receipt.get("offset")) == ("r", str(BACKLOG))
    assert [f.body for f in replayed] == bodies
    assert offsets(replayed) == list(range(1, BACKLOG + 1))
    assert (live.body, live.get("offset"), live.get("subscription")) == (b"live", "61", "s")


@pytest.mark.parametrize("history", ["sqlite", "memory"])
async def test_messages_published_during_a_replay_follow_it_exactly_once(
    start_server, pki, history: str
) -> None:
    server = await start_server(history=history, **SMALL_BUFFER)
    during = 10
    async with stomp_peer(server, pki, "alice") as alice, stomp_peer(server, pki, "bob") as bob:
        await publish_pipelined(alice, "/topic/big", backlog_bodies())
        # Bob's own SENDs are handled right after the SUBSCRIBE, while its replay has only
        # pushed its first chunk: they are published mid-replay.
        sends = [frame("SEND", destination="/topic/big") for _ in range(during - 1)]
        await send_together(
            bob,
            frame("SUBSCRIBE", destination="/topic/big", id="s", since_offset="0"),
            *sends,
            frame("SEND", destination="/topic/big", receipt="sent"),
        )
        frames = [await bob.receive() for _ in range(BACKLOG + during + 1)]
    assert [f.get("receipt-id") for f in frames if f.command == "RECEIPT"] == ["sent"]
    assert offsets(frames) == list(range(1, BACKLOG + during + 1))


async def test_unsubscribe_mid_replay_is_clean(start_server, pki) -> None:
    server = await start_server(**SMALL_BUFFER)
    async with stomp_peer(server, pki, "alice") as alice, stomp_peer(server, pki, "bob") as bob:
        await publish_pipelined(alice, "/topic/big", backlog_bodies())
        await send_together(
            bob,
            frame("SUBSCRIBE", destination="/topic/big", id="r", since_offset="0"),
            frame("UNSUBSCRIBE", id="r", receipt="gone"),
        )
        first = await messages_until_receipt(bob, "gone")  # the first chunk, then no more
        assert len(server.server.broker) == 0  # the replaying subscription never went live
        seen = str(len(first))
        await bob.send(
            "SUBSCRIBE",
            {"destination": "/topic/big", "id": "again", "since-offset": seen, "receipt": "r"},
        )
        rest, again = await replay_and_receipt(bob, BACKLOG - len(first))
        assert again.get("recovered") == "true"
        await publish(alice, "/topic/big", [b"live"])
        live = await bob.receive()
    assert 0 < len(first) < BACKLOG
    assert {f.get("subscription") for f in first} == {"r"}
    assert {f.get("subscription") for f in rest + [live]} == {"again"}
    assert offsets(first + rest + [live]) == list(range(1, BACKLOG + 2))


async def test_replay_that_falls_behind_retention_ends_with_an_error(start_server, pki) -> None:
    server = await start_server(retention_count=BACKLOG, **SMALL_BUFFER)
    async with stomp_peer(server, pki, "alice") as alice:
        await publish_pipelined(alice, "/topic/big", backlog_bodies())
        async with stomp_peer(server, pki, "bob") as bob:
            # Ten more messages while bob's replay is at its first chunk: offsets 1-10 drop out.
            sends = [frame("SEND", destination="/topic/big") for _ in range(10)]
            await send_together(
                bob, frame("SUBSCRIBE", destination="/topic/big", id="s", since_offset="0"), *sends
            )
            got = await closed_with(bob, "replay fell behind retention", 1008)
        assert 0 < len(got) < 10 and offsets(got) == list(range(1, len(got) + 1))
        resume = {"since-offset": str(len(got)), "epoch": got[0].get("epoch"), "receipt": "r"}
        await alice.send("SUBSCRIBE", {"destination": "/topic/big", "id": "s", **resume})
        kept, receipt = await replay_and_receipt(alice, BACKLOG)
    assert receipt.get("recovered") == "false"
    assert offsets(kept) == list(range(11, BACKLOG + 11))


# ---------------------------------------------------------------- last:N (PROTOCOL.md §11)


async def test_last_delivers_the_latest_retained_then_live(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await publish(alice, "/topic/l", [b"m1", b"m2", b"m3", b"m4", b"m5"])
        await alice.send("SUBSCRIBE", {"destination": "/topic/l", "id": "3", "last": "3"})
        await alice.send(
            "SUBSCRIBE", {"destination": "/topic/l", "id": "9", "last": "9", "receipt": "r"}
        )
        replayed = []
        while (receipt := await alice.receive()).command == "MESSAGE":
            replayed.append(receipt)
        none = await subscribe(alice, "/topic/l", "0", last="0")
        live = await publish(alice, "/topic/l", [b"m6"])
    assert [(f.get("subscription"), f.body) for f in replayed] == [
        ("3", b"m3"),
        ("3", b"m4"),
        ("3", b"m5"),
        ("9", b"m1"),
        ("9", b"m2"),
        ("9", b"m3"),
        ("9", b"m4"),
        ("9", b"m5"),
    ]
    for got in (receipt, none):
        assert (got.command, got.get("offset"), got.get("recovered")) == ("RECEIPT", "5", None)
        assert got.get("epoch") == replayed[0].get("epoch")
    assert sorted((f.get("subscription"), f.get("offset")) for f in live) == [
        ("0", "6"),
        ("3", "6"),
        ("9", "6"),
    ]


async def test_last_on_a_quiet_topic_goes_live_at_once(server, pki: TestPki) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        receipt = await subscribe(alice, "/topic/never", last="5")
        live = await publish(alice, "/topic/never", [b"first"])
    assert (receipt.command, receipt.get("offset")) == ("RECEIPT", "0")
    assert [(f.body, f.get("offset")) for f in live] == [(b"first", "1")]


@pytest.mark.parametrize(
    ("destination", "headers", "message", "code"),
    [
        ("/topic/a.*", {"last": "3"}, "last needs an exact topic", 1008),
        ("/topic/#", {"last": "0"}, "last needs an exact topic", 1008),
        ("/topic/a", {"last": "3", "since-offset": "0"}, "since-offset and last together", 1002),
    ],
    ids=["wildcard", "hash", "both"],
)
async def test_last_refused(
    server, pki: TestPki, destination: str, headers: dict[str, str], message: str, code: int
) -> None:
    async with stomp_peer(server, pki, "alice") as alice:
        await alice.send("SUBSCRIBE", {"destination": destination, "id": "s", **headers})
        await closed_with(alice, message, code)
