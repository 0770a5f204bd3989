"""Per-topic history: offsets, epochs, retention, replay, SQLite durability (PROTOCOL.md §8)."""

from __future__ import annotations

import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.history import History, HistoryGap, Position
from chat.store.history import Batch, Retention, Stored

NOW = time.time_ns() // 1_000_000  # ms; loading from disk prunes by the real clock
A = "/topic/a"
B = "/topic/b.c"


def _publish(history: History, destination: str, n: int, ts: int = NOW) -> list[Stored]:
    return [
        history.append(destination, "alice", "text/plain", f"m{i}".encode(), (), ts)
        for i in range(n)
    ]


@dataclass(frozen=True)
class Replay:
    """Everything a resuming subscriber is sent, and the RECEIPT's `recovered`."""

    messages: tuple[Stored, ...]
    recovered: bool


def _resume(
    history: History, destination: str, since: int, epoch: str | None, now_ms: int
) -> Replay:
    """A whole replay at once: where `resume` starts it, then `read` to the high-water mark."""
    start = history.resume(destination, since, epoch, now_ms)
    read = history.read(destination, start.after, history.epoch(destination), now_ms)
    return Replay(tuple(read), start.recovered)


def _offsets(replay: Replay) -> list[int]:
    return [m.offset for m in replay.messages]


def _commit_all(history: History) -> Batch:
    batch = history.take_pending()
    history.commit(batch)
    history.mark_committed(batch)
    return batch


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "history.db"


# ---------------------------------------------------------------- offsets and epochs


def test_offsets_start_at_one_per_topic() -> None:
    history = History.memory()
    first = history.append(A, "alice", "text/plain", b"hi", (("x-k", "v"),), NOW)
    assert (first.destination, first.offset, first.sender, first.body) == (A, 1, "alice", b"hi")
    assert (first.content_type, first.headers, first.timestamp_ms) == (
        "text/plain",
        (("x-k", "v"),),
        NOW,
    )
    assert [m.offset for m in _publish(history, A, 2)] == [2, 3]
    assert [m.offset for m in _publish(history, B, 2)] == [1, 2]
    assert history.append(A, "bob", "text/plain", b"", (), NOW).offset == 4


def test_seq_is_store_wide() -> None:
    history = History.memory()
    seqs = [history.append(d, "a", "t", b"", (), NOW).seq for d in (A, B, A, B)]
    assert seqs == [1, 2, 3, 4]
    assert history.last_seq == 4


def test_epoch_is_stable_per_topic() -> None:
    history = History.memory()
    epoch = history.epoch(A)
    assert len(epoch) == 12
    assert int(epoch, 16) >= 0
    assert all(m.epoch == epoch for m in _publish(history, A, 3))
    assert history.epoch(A) == epoch
    assert history.epoch(B) != epoch


def test_memory_store_restart_mints_new_epochs() -> None:
    before = History.memory()
    _publish(before, A, 3)
    after = History.memory()
    assert after.epoch(A) != before.epoch(A)
    assert after.append(A, "alice", "t", b"", (), NOW).offset == 1
    replay = _resume(after, A, 3, before.epoch(A), NOW)
    assert replay.recovered is False
    assert _offsets(replay) == [1]


def test_memory_store_is_always_committed() -> None:
    history = History.memory()
    _publish(history, A, 3)
    assert history.durable is False
    assert history.committed_seq == history.last_seq == 3
    assert not history.take_pending()
    history.commit(history.take_pending())
    history.close()


def test_retention_rejects_negative_limits() -> None:
    with pytest.raises(ValueError, match="negative"):
        Retention(max_count=-1)
    with pytest.raises(ValueError, match="negative"):
        Retention(max_age=-1.0)


# ---------------------------------------------------------------- replay


@pytest.mark.parametrize(
    ("since", "expected", "recovered"),
    [(0, [1, 2, 3, 4, 5], True), (2, [3, 4, 5], True), (5, [], True), (6, [], False)],
    ids=["zero", "middle", "last", "beyond"],
)
def test_replay_since(since: int, expected: list[int], recovered: bool) -> None:
    history = History.memory()
    _publish(history, A, 5)
    for epoch in (None, history.epoch(A)):
        replay = _resume(history, A, since, epoch, NOW)
        assert (_offsets(replay), replay.recovered) == (expected, recovered)


def test_replay_is_per_topic() -> None:
    history = History.memory()
    _publish(history, A, 2)
    _publish(history, B, 3)
    assert {m.destination for m in _resume(history, B, 0, None, NOW).messages} == {B}


def test_epoch_mismatch_replays_everything_retained() -> None:
    history = History.memory()
    _publish(history, A, 4)
    replay = _resume(history, A, 3, "0123456789ab", NOW)
    assert (_offsets(replay), replay.recovered) == ([1, 2, 3, 4], False)


def test_replay_of_unknown_topic() -> None:
    history = History.memory()
    assert _resume(history, A, 0, None, NOW) == Replay((), True)
    assert _resume(history, A, 3, None, NOW) == Replay((), False)
    assert _resume(history, A, 0, "0123456789ab", NOW) == Replay((), False)


def test_retention_by_count_leaves_a_gap() -> None:
    history = History(Retention(max_count=3))
    _publish(history, A, 5)
    replay = _resume(history, A, 0, None, NOW)
    assert (_offsets(replay), replay.recovered) == ([3, 4, 5], False)
    replay = _resume(history, A, 1, None, NOW)
    assert (_offsets(replay), replay.recovered) == ([3, 4, 5], False)
    replay = _resume(history, A, 2, None, NOW)
    assert (_offsets(replay), replay.recovered) == ([3, 4, 5], True)


def test_retention_by_age() -> None:
    history = History(Retention(max_age=10.0))
    _publish(history, A, 2, ts=NOW)
    _publish(history, A, 2, ts=NOW + 5_000)
    replay = _resume(history, A, 0, None, NOW + 10_000)
    assert (_offsets(replay), replay.recovered) == ([1, 2, 3, 4], True)
    replay = _resume(history, A, 0, None, NOW + 12_000)
    assert (_offsets(replay), replay.recovered) == ([3, 4], False)
    replay = _resume(history, A, 2, None, NOW + 12_000)
    assert (_offsets(replay), replay.recovered) == ([3, 4], True)
    replay = _resume(history, A, 4, None, NOW + 60_000)
    assert (_offsets(replay), replay.recovered) == ([], True)
    replay = _resume(history, A, 3, None, NOW + 60_000)
    assert (_offsets(replay), replay.recovered) == ([], False)


def test_append_expires_old_messages() -> None:
    history = History(Retention(max_age=1.0))
    _publish(history, A, 3, ts=NOW)
    _publish(history, A, 1, ts=NOW + 2_000)
    assert _offsets(_resume(history, A, 0, None, NOW)) == [4]


# ---------------------------------------------------------------- paged reads (PROTOCOL.md §11)


def test_read_pages_from_any_offset_up_to_the_high_water_mark(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    _publish(history, A, 5)
    _commit_all(history)
    _publish(history, A, 2)  # not committed: nobody may see offsets 6 and 7 yet
    epoch = history.epoch(A)
    assert [m.offset for m in history.read(A, 0, epoch, NOW)] == [1, 2, 3, 4, 5]
    assert [m.offset for m in history.read(A, 3, epoch, NOW)] == [4, 5]
    assert list(history.read(A, 5, epoch, NOW)) == []
    _commit_all(history)
    assert [m.offset for m in history.read(A, 5, epoch, NOW)] == [6, 7]
    history.close()


def test_read_past_what_retention_keeps_is_a_gap() -> None:
    history = History(Retention(max_count=3))
    _publish(history, A, 3)
    epoch = history.epoch(A)
    assert [m.offset for m in history.read(A, 0, epoch, NOW)] == [1, 2, 3]
    _publish(history, A, 2)  # offsets 1 and 2 drop out of the retained tail
    with pytest.raises(HistoryGap):
        history.read(A, 0, epoch, NOW)
    with pytest.raises(HistoryGap):
        history.read(A, 1, epoch, NOW)
    assert [m.offset for m in history.read(A, 2, epoch, NOW)] == [3, 4, 5]
    assert list(history.read(A, 5, epoch, NOW)) == []  # caught up: nothing is missing


def test_read_past_what_age_keeps_is_a_gap() -> None:
    history = History(Retention(max_age=1.0))
    _publish(history, A, 2, ts=NOW)
    with pytest.raises(HistoryGap):
        history.read(A, 0, history.epoch(A), NOW + 2_000)
    assert list(history.read(A, 2, history.epoch(A), NOW + 2_000)) == []


def test_read_of_another_epoch_is_a_gap() -> None:
    history = History.memory()
    _publish(history, A, 2)
    with pytest.raises(HistoryGap):
        history.read(A, 0, "0123456789ab", NOW)


@pytest.mark.parametrize(
    ("count", "after"), [(0, 5), (2, 3), (5, 0), (9, 0)], ids=["none", "some", "all", "more"]
)
def test_tail_starts_a_replay_of_the_last_count(count: int, after: int) -> None:
    history = History.memory()
    _publish(history, A, 5)
    assert history.tail(A, count, NOW) == after


def test_tail_sees_only_what_is_retained_and_committed(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_count=4))
    _publish(history, A, 6)
    _commit_all(history)
    _publish(history, A, 1)  # offset 7, not committed; retained now 4..7
    assert history.tail(A, 10, NOW) == 3
    assert history.tail(A, 2, NOW) == 4
    assert history.tail(B, 3, NOW) == 0  # a topic with no message
    history.close()


# ---------------------------------------------------------------- a quiet room's epoch


def test_position_of_a_new_topic_makes_its_epoch_durable(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    position = history.position(A)
    assert (position.offset, position.durable_seq, history.committed_seq) == (0, 1, 0)
    assert history.position(A) == position  # minted once
    batch = _commit_all(history)
    assert (batch.messages, batch.topics, batch.seq) == ([], [(A, position.epoch)], 1)
    assert history.committed_seq == 1
    history.close()
    reopened = History.open_sqlite(db_path)
    assert reopened.position(A) == Position(position.epoch, 0, 0)
    assert _resume(reopened, A, 0, position.epoch, NOW) == Replay((), True)
    assert reopened.append(A, "alice", "t", b"", (), NOW).offset == 1
    assert not reopened.take_pending().topics  # loaded, not minted
    reopened.close()


def test_a_quiet_topic_row_never_overwrites_a_real_one(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    epoch = history.position(A).epoch
    _publish(history, A, 2)  # the mint and the messages land in one batch
    _commit_all(history)
    history.close()
    reopened = History.open_sqlite(db_path)
    assert reopened.position(A) == Position(epoch, 2, 0)
    reopened.commit(Batch([], [(A, "0123456789ab")], 0))  # as if minted again elsewhere
    reopened.close()
    again = History.open_sqlite(db_path)
    assert again.position(A) == Position(epoch, 2, 0)
    again.close()


def test_a_topic_minted_by_a_message_is_durable_with_it(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    (first,) = _publish(history, A, 1)
    assert history.position(A).durable_seq == first.seq
    assert history.take_pending().topics == []
    history.close()


def test_memory_store_mints_without_waiting() -> None:
    history = History.memory()
    assert history.position(A).durable_seq <= history.committed_seq
    assert not history.take_pending()


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from([A, B]), st.integers(0, 3_000)), max_size=40),
    max_count=st.integers(0, 8),
    since=st.integers(0, 45),
    later=st.integers(0, 12_000),
)
def test_replay_returns_exactly_the_retained_messages_after_since(
    ops: list[tuple[str, int]], max_count: int, since: int, later: int
) -> None:
    history = History(Retention(max_count=max_count, max_age=10.0))
    published: dict[str, list[Stored]] = {A: [], B: []}
    ts = NOW
    for destination, step in ops:
        ts += step
        published[destination].append(history.append(destination, "a", "t", b"", (), ts))
    now = ts + later
    for destination, messages in published.items():
        kept = messages[-max_count:] if max_count else []
        retained = [m for m in kept if m.timestamp_ms >= now - 10_000]
        replay = _resume(history, destination, since, None, now)
        last = len(messages)
        if since > last:
            assert replay == Replay((), False)
            continue
        first = retained[0].offset if retained else last + 1
        assert list(replay.messages) == [m for m in retained if m.offset > since]
        assert replay.recovered is (first <= since + 1)


# ---------------------------------------------------------------- SQLite


def test_sqlite_group_commit(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    assert history.durable is True
    stored = _publish(history, A, 3) + _publish(history, B, 2)
    assert (history.last_seq, history.committed_seq) == (5, 0)
    batch = history.take_pending()
    assert (batch.messages, batch.topics, batch.seq) == (stored, [], 5)
    assert not history.take_pending()
    history.commit(batch)
    assert history.committed_seq == 0  # until the event loop marks it
    history.mark_committed(batch)
    assert history.committed_seq == 5
    history.append(A, "alice", "t", b"", (), NOW)
    assert (history.last_seq, history.committed_seq) == (6, 5)
    history.close()


def test_commit_twice_is_harmless(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    _publish(history, A, 3)
    batch = history.take_pending()
    history.commit(batch)
    history.commit(batch)
    history.close()
    reopened = History.open_sqlite(db_path)
    assert _offsets(_resume(reopened, A, 0, None, NOW)) == [1, 2, 3]
    reopened.close()


def test_reopen_continues_offsets_with_same_epoch(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    body = b"\x00binary\x00body\xff"
    headers = (("x-trace", "a:b"), ("x-empty", ""), ("x-uni", "é\n"))
    first = history.append(A, "alice", "application/octet-stream", body, headers, NOW)
    _publish(history, A, 2)
    _publish(history, B, 1)
    _commit_all(history)
    epoch_a, epoch_b = history.epoch(A), history.epoch(B)
    before = _resume(history, A, 0, None, NOW)
    history.close()

    reopened = History.open_sqlite(db_path)
    assert (reopened.epoch(A), reopened.epoch(B)) == (epoch_a, epoch_b)
    after = _resume(reopened, A, 0, epoch_a, NOW)
    assert after.recovered is True
    assert [(m.offset, m.body, m.headers, m.epoch) for m in after.messages] == [
        (m.offset, m.body, m.headers, m.epoch) for m in before.messages
    ]
    loaded = after.messages[0]
    assert (loaded.sender, loaded.content_type, loaded.timestamp_ms) == (
        first.sender,
        first.content_type,
        first.timestamp_ms,
    )
    assert (loaded.body, loaded.headers) == (body, headers)
    assert reopened.append(A, "bob", "t", b"", (), NOW).offset == 4
    assert reopened.append(B, "bob", "t", b"", (), NOW).offset == 2
    reopened.close()


def test_close_commits_what_is_pending(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    _publish(history, A, 2)
    history.close()
    assert history.committed_seq == 2
    reopened = History.open_sqlite(db_path)
    assert _offsets(_resume(reopened, A, 0, None, NOW)) == [1, 2]
    reopened.close()


def test_crash_keeps_epochs_and_reuses_only_offsets_nobody_saw(db_path: Path) -> None:
    crashed = History.open_sqlite(db_path)
    _publish(crashed, A, 3)
    _publish(crashed, B, 1)
    _commit_all(crashed)
    _publish(crashed, A, 2)  # appended, never committed, then the process dies
    # the high-water mark: uncommitted messages are invisible to replay and position
    assert _offsets(_resume(crashed, A, 0, None, NOW)) == [1, 2, 3]
    assert crashed.position(A) == Position(crashed.epoch(A), 3, 1)
    old_a, old_b = crashed.epoch(A), crashed.epoch(B)

    restarted = History.open_sqlite(db_path)
    assert (restarted.epoch(A), restarted.epoch(B)) == (old_a, old_b)
    replay = _resume(restarted, A, 3, old_a, NOW)
    assert (_offsets(replay), replay.recovered) == ([], True)
    assert restarted.append(A, "alice", "t", b"new", (), NOW).offset == 4
    restarted.close()


def test_a_lost_batch_is_a_gap_not_wrong_data(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    _publish(history, A, 2)
    lost = history.take_pending()
    _publish(history, A, 2)
    history.commit(history.take_pending())  # a later batch lands; the earlier one never did
    history.close()
    reopened = History.open_sqlite(db_path)
    assert [m.offset for m in lost.messages] == [1, 2]
    replay = _resume(reopened, A, 0, None, NOW)
    assert (_offsets(replay), replay.recovered) == ([3, 4], False)
    replay = _resume(reopened, A, 2, None, NOW)
    assert (_offsets(replay), replay.recovered) == ([3, 4], True)
    reopened.close()


def test_sqlite_retention_by_count(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_count=3))
    _publish(history, A, 4)
    _commit_all(history)
    _publish(history, A, 3)
    _commit_all(history)
    history.close()
    reopened = History.open_sqlite(db_path, Retention(max_count=2))
    replay = _resume(reopened, A, 0, None, NOW)
    assert (_offsets(replay), replay.recovered) == ([6, 7], False)
    assert reopened.append(A, "alice", "t", b"", (), NOW).offset == 8
    reopened.close()


def test_sqlite_retention_by_age(db_path: Path) -> None:
    now = time.time_ns() // 1_000_000
    history = History.open_sqlite(db_path, Retention(max_age=3600.0))
    _publish(history, A, 2, ts=now - 7200_000)
    _publish(history, A, 1, ts=now)
    _commit_all(history)
    history.close()
    reopened = History.open_sqlite(db_path, Retention(max_age=3600.0))
    replay = _resume(reopened, A, 0, None, now)
    assert (_offsets(replay), replay.recovered) == ([3], False)
    reopened.close()


def test_topic_whose_history_expired_keeps_its_offsets(db_path: Path) -> None:
    history = History.open_sqlite(db_path, Retention(max_age=1.0))
    _publish(history, A, 2, ts=NOW)
    _commit_all(history)
    history.close()
    reopened = History.open_sqlite(db_path, Retention(max_age=1.0))
    assert _resume(reopened, A, 2, None, NOW) == Replay((), True)
    assert reopened.append(A, "alice", "t", b"", (), NOW).offset == 3
    reopened.close()


def test_commit_from_a_worker_thread_while_appending(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    for _ in range(5):
        _publish(history, A, 50)
        batch = history.take_pending()
        worker = threading.Thread(target=history.commit, args=(batch,))
        worker.start()
        _publish(history, B, 50)  # the event loop keeps going meanwhile
        worker.join()
        history.mark_committed(batch)
        assert history.committed_seq == batch.seq == batch.messages[-1].seq
    history.close()
    reopened = History.open_sqlite(db_path)
    assert _offsets(_resume(reopened, A, 0, None, NOW)) == list(range(1, 251))
    assert _offsets(_resume(reopened, B, 0, None, NOW)) == list(range(1, 251))
    reopened.close()


def test_file_is_owner_only(db_path: Path) -> None:
    history = History.open_sqlite(db_path)
    _publish(history, A, 1)
    _commit_all(history)
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    history.close()
