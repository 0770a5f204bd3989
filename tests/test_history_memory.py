"""Bounded history memory (issue 11): bytes in memory, topics in memory, bytes per topic on disk,
bounded loading; replays across the memory/disk boundary stay exact (PROTOCOL.md §8, §11)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.history import History, HistoryGap, NotLoaded, OnDisk
from chat.store.history import Batch, Retention, Stored, footprint

NOW = time.time_ns() // 1_000_000  # ms; loading from disk prunes by the real clock
A, B, C = "/topic/a", "/topic/b", "/topic/c"
BODY = b"x" * 1000
COST = footprint(Stored(A, 1, "e", NOW, "alice", "text/plain", BODY, (), 1))


def _publish(
    history: History, destination: str, n: int, body: bytes = BODY, ts: int = NOW
) -> list[Stored]:
    return [history.append(destination, "alice", "text/plain", body, (), ts) for _ in range(n)]


def _commit_all(history: History) -> Batch:
    batch = history.take_pending()
    history.commit(batch)
    history.mark_committed(batch)
    return batch


def _replay(
    history: History,
    destination: str,
    after: int,
    epoch: str,
    page_bytes: int = 1,
    between: Callable[[], None] = lambda: None,
) -> list[int]:
    """What a session sends: `read` what memory holds, `fetch` what is on disk only, until
    `read` has nothing more (the high-water mark)."""
    offsets: list[int] = []
    while True:
        try:
            page = list(history.read(destination, after, epoch, NOW))
        except OnDisk as on_disk:
            page = history.fetch(on_disk.page, page_bytes)
        if not page:
            return offsets
        offsets += [m.offset for m in page]
        after = page[-1].offset
        between()


def _load(history: History, *destinations: str) -> None:
    """What the server does before using topics that may be on disk only."""
    while (load := history.missing(*destinations)) is not None:
        history.install(load, history.load_topics(load))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "history.db"


# ---------------------------------------------------------------- bytes in memory


def test_memory_never_holds_more_than_its_budget(db_path: Path) -> None:
    budget = 7 * COST + 10
    history = History.open_sqlite(db_path, Retention(memory_bytes=budget))
    for round_ in range(20):
        _publish(history, (A, B, C)[round_ % 3], 1 + round_ % 4)
        _commit_all(history)
        assert history.memory_bytes <= budget
    assert history.memory_bytes == 7 * COST  # full: the newest seven are kept
    history.close()


def test_messages_leave_memory_oldest_first(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(memory_bytes=4 * COST))
    _publish(history, A, 3)
    _publish(history, B, 2)
    _commit_all(history)
    epoch_a = history.epoch(A)
    with pytest.raises(OnDisk) as on_disk:
        list(history.read(A, 0, epoch_a, NOW))
    assert (on_disk.value.page.after, on_disk.value.page.until) == (0, 1)
    assert [m.offset for m in history.read(A, 1, epoch_a, NOW)] == [2, 3]
    assert [m.offset for m in history.read(B, 0, history.epoch(B), NOW)] == [1, 2]
    history.close()


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(0, 40),
    kept=st.integers(0, 12),
    since=st.integers(0, 45),
    page=st.integers(1, 5),
)
def test_replay_across_the_memory_disk_boundary_is_exact(
    tmp_path_factory: pytest.TempPathFactory, count: int, kept: int, since: int, page: int
) -> None:
    path = tmp_path_factory.mktemp("h") / "history.db"
    history = History.open_sqlite(path, Retention(max_count=30, memory_bytes=kept * COST))
    _publish(history, A, count)
    _commit_all(history)
    epoch = history.epoch(A)
    start = history.resume(A, since, epoch, NOW)
    first = max(count - 30 + 1, 1)
    assert start.recovered is (first <= since + 1 and since <= count)
    assert start.after == (max(since, first - 1) if since <= count else count)
    assert _replay(history, A, start.after, epoch, page * len(BODY)) == list(
        range(start.after + 1, count + 1)
    )
    history.close()


def test_replay_stays_exact_while_memory_moves_under_it(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(memory_bytes=3 * COST))
    _publish(history, A, 20)
    _commit_all(history)

    rounds = iter(range(12))

    def traffic() -> None:  # others publish between pages, pushing memory's window forward
        if next(rounds, None) is not None:
            _publish(history, A, 1)
            _publish(history, B, 2)
            _commit_all(history)

    offsets = _replay(history, A, 4, history.epoch(A), 2 * len(BODY), traffic)
    assert offsets == list(range(5, history.position(A).offset + 1))
    assert len(offsets) == 16 + 12
    history.close()


def test_a_replay_whose_disk_page_retention_dropped_is_a_gap(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_count=5, memory_bytes=COST))
    _publish(history, A, 5)
    _commit_all(history)
    with pytest.raises(OnDisk) as on_disk:
        history.read(A, 1, history.epoch(A), NOW)
    _publish(history, A, 3)  # count retention drops offsets 1-3 from the file
    _commit_all(history)
    with pytest.raises(HistoryGap):
        history.fetch(on_disk.value.page, 10_000)
    with pytest.raises(HistoryGap):
        history.read(A, 1, history.epoch(A), NOW)
    history.close()


def test_memory_store_over_its_budget_drops_history() -> None:
    history = History.memory(Retention(memory_bytes=3 * COST))
    _publish(history, A, 5)
    assert history.memory_bytes == 3 * COST
    start = history.resume(A, 0, history.epoch(A), NOW)
    assert (start.after, start.recovered) == (2, False)
    assert [m.offset for m in history.read(A, 2, history.epoch(A), NOW)] == [3, 4, 5]
    with pytest.raises(HistoryGap):
        history.read(A, 0, history.epoch(A), NOW)


# ---------------------------------------------------------------- topics in memory


def test_idle_topics_leave_memory_and_come_back_with_their_epoch_and_offsets(
    db_path: Path,
) -> None:
    history = History.open_sqlite(db_path, Retention(max_topics=2))
    for destination in (A, B, C):
        _publish(history, destination, 3)
        _commit_all(history)
        assert history.topics_in_memory <= 2
    with pytest.raises(NotLoaded):
        history.append(A, "alice", "t", b"", (), NOW)
    assert history.last_seq == 9  # refused before anything was given
    _load(history, A)
    assert history.topics_in_memory <= 2 + 1
    epoch_a = history.epoch(A)
    start = history.resume(A, 1, epoch_a, NOW)
    assert (start.after, start.recovered) == (1, True)
    assert _replay(history, A, 0, epoch_a) == [1, 2, 3]
    assert history.append(A, "alice", "t", b"", (), NOW).offset == 4
    _commit_all(history)
    history.close()
    reopened = History.open_sqlite(db_path)
    assert (reopened.epoch(A), reopened.position(A).offset) == (epoch_a, 4)
    reopened.close()


def test_least_recently_used_topic_leaves_first(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_topics=2))
    _publish(history, A, 1)
    _publish(history, B, 1)
    _commit_all(history)
    history.position(A)  # A is used again: B is now the least recently used
    _publish(history, C, 1)
    _commit_all(history)
    assert history.missing(A, B, C) is not None
    assert history.missing(A, C) is None
    history.close()


def test_a_subscribed_quiet_topic_does_not_pin_memory(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_topics=3))
    epochs = {}
    for i in range(10):
        _load(history, f"/topic/quiet{i}")  # past 3 topics, a new name may be on disk
        epochs[i] = history.position(f"/topic/quiet{i}").epoch
        _commit_all(history)
        assert history.topics_in_memory <= 3
    _load(history, "/topic/quiet0")
    position = history.position("/topic/quiet0")
    assert (position.epoch, position.offset) == (epochs[0], 0)
    history.close()


def test_memory_store_forgets_idle_topics() -> None:
    history = History.memory(Retention(max_topics=2))
    first_epoch = history.position(A).epoch
    for destination in (B, C):
        _publish(history, destination, 1)
    assert history.topics_in_memory == 2
    assert history.missing(A) is None  # no disk: a topic that left is simply new
    assert history.position(A).epoch != first_epoch  # its history is lost: a new epoch says so


def test_topics_waiting_for_their_commit_stay_in_memory(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_topics=1))
    _publish(history, A, 1)
    _publish(history, B, 1)
    history.position(C)
    assert history.topics_in_memory == 3  # nothing of theirs is on disk yet
    _commit_all(history)
    assert history.topics_in_memory == 1
    history.close()


def test_a_new_topic_after_evictions_is_read_from_disk_then_minted(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_topics=1))
    _publish(history, A, 1)
    _publish(history, B, 1)
    _commit_all(history)
    with pytest.raises(NotLoaded):
        history.position(C)
    _load(history, C)
    position = history.position(C)
    assert (position.offset, position.durable_seq) == (0, 3)
    assert history.take_pending().topics == [(C, position.epoch)]
    history.close()


def test_a_topic_evicted_while_being_read_is_read_again(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_topics=1))
    _publish(history, A, 1)
    _publish(history, B, 1)
    _commit_all(history)
    slow = history.missing(A)  # one connection asks for A...
    assert slow is not None
    stale = history.load_topics(slow)
    _load(history, A)  # ...another loads it, publishes, and A leaves memory again
    _publish(history, A, 1)
    _commit_all(history)
    _load(history, B)
    _publish(history, B, 1)
    _commit_all(history)
    history.install(slow, stale)  # what the first read is out of date: not installed
    assert history.missing(A) is not None
    _load(history, A)
    assert history.append(A, "alice", "t", b"", (), NOW).offset == 3
    history.close()


# ---------------------------------------------------------------- bytes per topic


def _rows(path: Path, destination: str) -> list[int]:
    with sqlite3.connect(path) as db:
        query = "SELECT offset FROM messages WHERE destination = ? ORDER BY offset"
        return [row[0] for row in db.execute(query, (destination,))]


def test_retention_by_bytes_per_topic(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_bytes=2500))
    _publish(history, A, 5)
    _publish(history, B, 1)
    _commit_all(history)
    assert (_rows(db_path, A), _rows(db_path, B)) == ([4, 5], [1])
    start = history.resume(A, 0, history.epoch(A), NOW)
    assert (start.after, start.recovered) == (3, False)
    assert _replay(history, A, 3, history.epoch(A)) == [4, 5]
    _publish(history, A, 1, b"y" * 2600)  # alone over the limit: nothing of A is kept
    _commit_all(history)
    assert _rows(db_path, A) == []
    assert history.resume(A, 5, history.epoch(A), NOW).recovered is False
    history.close()


def test_memory_store_retention_by_bytes() -> None:
    history = History.memory(Retention(max_bytes=2500))
    _publish(history, A, 5)
    assert history.tail(A, 10, NOW) == 3


def test_restart_applies_a_lower_bytes_retention(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    _publish(history, A, 5)
    _publish(history, B, 2)
    history.close()
    reopened = History.open_sqlite(db_path, Retention(max_bytes=1500))
    assert (_rows(db_path, A), _rows(db_path, B)) == ([5], [2])
    assert reopened.tail(A, 10, NOW) == 4
    reopened.close()


# ---------------------------------------------------------------- bounded loading


def test_restart_loads_only_what_fits(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    for i, destination in enumerate((A, B, C)):
        _publish(history, destination, 40, ts=NOW + i)
        _commit_all(history)
    epochs = {d: history.epoch(d) for d in (A, B, C)}
    history.close()
    reopened = History.open_sqlite(db_path, Retention(memory_bytes=25 * COST, max_topics=2))
    assert reopened.memory_bytes == 25 * COST
    assert reopened.topics_in_memory == 2
    assert reopened.missing(B, C) is None  # the most recently written ones
    _load(reopened, A)
    assert reopened.missing(C, A) is None  # B was the least recently used
    for destination, epoch in epochs.items():
        _load(reopened, destination)
        assert reopened.epoch(destination) == epoch
        assert _replay(reopened, destination, 0, epoch, 7 * len(BODY)) == list(range(1, 41))
    _load(reopened, A)
    assert reopened.append(A, "alice", "t", b"", (), NOW).offset == 41
    reopened.close()


def test_restart_with_no_memory_budget_still_knows_every_topic(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    _publish(history, A, 3)
    history.close()
    reopened = History.open_sqlite(db_path, Retention(memory_bytes=0))
    assert reopened.memory_bytes == 0
    start = reopened.resume(A, 1, reopened.epoch(A), NOW)
    assert (start.after, start.recovered) == (1, True)
    assert _replay(reopened, A, 1, reopened.epoch(A)) == [2, 3]
    reopened.close()
