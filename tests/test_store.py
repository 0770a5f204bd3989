"""The storage primitives every store builds on: one SQLite transaction, one atomic writer."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from chat.store.files import write_atomic
from chat.store.sqlite import open_private, transaction


class Boom(Exception):
    """What the body of a transaction raises in these tests."""


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "test.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[sqlite3.Connection]:
    connection = open_private(db_path)
    connection.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    yield connection
    connection.close()


def _rows(db: sqlite3.Connection) -> list[int]:
    return [x for (x,) in db.execute("SELECT x FROM t ORDER BY x")]


def _impatient(path: Path) -> sqlite3.Connection:
    """Another writer that gives up at once instead of waiting out the busy timeout."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA busy_timeout = 0")
    return other


# ---------------------------------------------------------------- transaction()


def test_transaction_commits_everything(db: sqlite3.Connection, db_path: Path) -> None:
    lock = threading.Lock()
    with transaction(db, lock) as tx:
        tx.execute("INSERT INTO t VALUES (1)")
        tx.execute("INSERT INTO t VALUES (2)")
    assert not db.in_transaction and not lock.locked()
    other = _impatient(db_path)
    assert _rows(other) == [1, 2]  # committed: another connection sees both
    other.close()


@pytest.mark.parametrize("failure", ["raised", "sql"])
def test_transaction_rolls_back_everything_on_error(
    db: sqlite3.Connection, db_path: Path, failure: str
) -> None:
    lock = threading.Lock()
    with transaction(db, lock) as tx:
        tx.execute("INSERT INTO t VALUES (1)")
    expected = Boom if failure == "raised" else sqlite3.IntegrityError
    with pytest.raises(expected), transaction(db, lock) as tx:
        tx.execute("INSERT INTO t VALUES (2)")
        if failure == "raised":
            raise Boom("the caller changed its mind")
        tx.execute("INSERT INTO t VALUES (1)")  # primary key taken
    assert _rows(db) == [1]  # neither half of the failed transaction
    assert not db.in_transaction and not lock.locked()
    other = _impatient(db_path)
    other.execute("BEGIN IMMEDIATE")  # the write lock was released with the rollback
    other.execute("ROLLBACK")
    other.close()
    with transaction(db, lock) as tx:  # and the connection is usable again
        tx.execute("INSERT INTO t VALUES (3)")
    assert _rows(db) == [1, 3]


def test_transaction_takes_the_write_lock_before_its_first_statement(
    db: sqlite3.Connection, db_path: Path
) -> None:
    other = _impatient(db_path)
    with (
        transaction(db, threading.Lock()),
        pytest.raises(sqlite3.OperationalError, match="locked"),
    ):
        other.execute("BEGIN IMMEDIATE")  # a second writer waits (here: gives up) up front
    other.close()


# ---------------------------------------------------------------- write_atomic()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@contextmanager
def _umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_write_atomic_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    with _umask(0):
        write_atomic(path, b"token\n")
    assert path.read_bytes() == b"token\n"
    assert _mode(path) == 0o600
    assert _names(tmp_path) == ["secret"]  # no temporary left beside it


def test_write_atomic_takes_another_mode_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "public.pem"
    with _umask(0o022):
        write_atomic(path, b"certificate", mode=0o644)
    assert _mode(path) == 0o644


def test_write_atomic_swaps_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    write_atomic(path, b"old")
    with path.open("rb") as reader:  # a reader that opened the old file keeps all of it
        write_atomic(path, b"new and longer")
        assert reader.read() == b"old"
    assert path.read_bytes() == b"new and longer"
    assert _mode(path) == 0o600
    assert _names(tmp_path) == ["index.json"]


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.json"
    write_atomic(path, b"old")

    def disk_error(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", disk_error)
    with pytest.raises(OSError) as failed:
        write_atomic(path, b"new")
    assert failed.value.errno == errno.EIO
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["index.json"]


def test_exclusive_creates_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "kid.pem"
    write_atomic(path, b"key", exclusive=True)
    assert path.read_bytes() == b"key" and _mode(path) == 0o600
    assert _names(tmp_path) == ["kid.pem"]


def test_exclusive_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "kid.pem"
    path.write_bytes(b"the first key")
    with pytest.raises(FileExistsError):
        write_atomic(path, b"another key", exclusive=True)
    assert path.read_bytes() == b"the first key"
    assert _names(tmp_path) == ["kid.pem"]


def test_exclusive_refuses_a_symlink_in_the_way(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "kid.pem").symlink_to(target)
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "kid.pem", b"key", exclusive=True)
    assert not target.exists()
