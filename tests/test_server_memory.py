"""The server with its history's memory bounded (--history-memory-bytes, --max-topics): what
left memory is read back from disk off the event loop, and nothing a client sees changes.

Below TLS on the mock clock (tests/below_tls.py); storage runs inline there, so the reads
that production runs in a worker thread run in the same order here.
"""

from __future__ import annotations

import trio.testing

from tests.below_tls import BelowTls
from tests.conftest import StompPeer

SIZE = 1000  # bytes per message body


async def publish(peer: StompPeer, destination: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        body = f"{n:06d}".encode().ljust(SIZE, b".")
        await peer.send("SEND", {"destination": destination, "receipt": f"r{n}"}, body)
        frame = await peer.receive()
        assert frame.command == "RECEIPT", frame


async def received(peer: StompPeer, count: int) -> list[tuple[int, int]]:
    """(offset, number in the body) of the next `count` MESSAGEs."""
    got = []
    for _ in range(count):
        frame = await peer.receive()
        assert frame.command == "MESSAGE", frame
        got.append((int(frame.get("offset")), int(frame.body[:6])))
    return got


async def test_a_replay_reaches_back_past_memory_onto_disk(start_below_tls, autojump_clock) -> None:
    """20 KiB of memory for 200 KB of history: the replay pages the older 90 % from disk,
    exact and in order, then goes live with no gap."""
    below: BelowTls = await start_below_tls(history_memory_bytes=20 * SIZE)
    async with below.stomp_peer("alice") as alice, below.stomp_peer("bob") as bob:
        await publish(alice, "/topic/deep", 200)
        assert below.server.history.memory_bytes <= 20 * SIZE
        headers = {"destination": "/topic/deep", "id": "d", "since-offset": "0"}
        await bob.send("SUBSCRIBE", headers)
        assert await received(bob, 200) == [(n + 1, n) for n in range(200)]
        await publish(alice, "/topic/deep", 1, start=200)
        assert await received(bob, 1) == [(201, 200)]


async def test_topics_that_left_memory_come_back_with_their_epoch_and_offsets(
    start_below_tls, autojump_clock
) -> None:
    below: BelowTls = await start_below_tls(max_topics=2)
    async with below.stomp_peer("alice") as alice, below.stomp_peer("bob") as bob:
        await bob.send("SUBSCRIBE", {"destination": "/topic/t0", "id": "0", "receipt": "s"})
        epoch = (await bob.receive()).get("epoch")
        await bob.send("UNSUBSCRIBE", {"id": "0"})
        for topic in range(5):  # t0 leaves memory on the way
            await publish(alice, f"/topic/t{topic}", 3, start=10 * topic)
        assert "/topic/t0" not in below.server.history._topics  # noqa: SLF001 (the point)
        await publish(alice, "/topic/t0", 1, start=3)  # offsets go on: 4
        headers = {"destination": "/topic/t0", "id": "1", "last": "4", "receipt": "again"}
        await bob.send("SUBSCRIBE", headers)
        receipt = await bob.receive()
        assert (receipt.get("epoch"), receipt.get("offset")) == (epoch, "4")
        assert await received(bob, 4) == [(1, 0), (2, 1), (3, 2), (4, 3)]


async def test_a_direct_message_to_inboxes_that_left_memory(
    start_below_tls, autojump_clock
) -> None:
    below: BelowTls = await start_below_tls(max_topics=2)
    async with below.stomp_peer("alice") as alice, below.stomp_peer("bob") as bob:
        await publish(alice, "/user/bob", 2)  # bob's inbox and alice's
        await publish(alice, "/topic/x", 1)
        await publish(alice, "/topic/y", 1)  # both inboxes have left memory
        assert "/user/bob" not in below.server.history._topics  # noqa: SLF001 (the point)
        await publish(alice, "/user/bob", 1, start=2)  # read back, both at once
        await bob.send("SUBSCRIBE", {"destination": "/user/bob", "id": "in", "last": "5"})
        assert await received(bob, 3) == [(1, 0), (2, 1), (3, 2)]
        await alice.send("SUBSCRIBE", {"destination": "/user/alice", "id": "in", "last": "5"})
        assert await received(alice, 3) == [(1, 0), (2, 1), (3, 2)]


async def test_a_topic_that_leaves_memory_mid_replay_is_read_back(
    start_below_tls, autojump_clock
) -> None:
    """bob reads slowly (a lockstep stream): while his replay waits for him to drain the
    first chunk, other topics push its topic out of memory; the rest comes from disk."""
    below: BelowTls = await start_below_tls(
        max_topics=2, outbound_buffer_bytes=256 * 1024, max_frame_bytes=64 * 1024
    )
    async with below.stomp_peer("alice") as alice:
        await publish(alice, "/topic/deep", 200)
        async with below.stomp_peer("bob", pair=trio.testing.lockstep_stream_pair) as bob:
            headers = {"destination": "/topic/deep", "id": "d", "since-offset": "0"}
            await bob.send("SUBSCRIBE", headers)
            first = await received(bob, 1)  # the replay has begun; bob stops reading
            for topic in ("a", "b", "c"):
                await publish(alice, f"/topic/{topic}", 1)
            assert "/topic/deep" not in below.server.history._topics  # noqa: SLF001
            rest = await received(bob, 199)
            assert first + rest == [(n + 1, n) for n in range(200)]
