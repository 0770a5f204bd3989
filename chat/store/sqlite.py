"""The one way this project opens an SQLite file, and the one way it writes to one.

BLOCKING: a write waits up to `BUSY_TIMEOUT_MS` for another process's transaction, and a
commit waits for the disk (`synchronous=FULL`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from chat.store.errors import must_exist

FILE_MODE = 0o600  # tokens' hashes, revocations, message bodies: owner only
DIR_MODE = 0o700
BUSY_TIMEOUT_MS = 5000  # how long a write waits for another process's transaction


def open_private(path: Path, *, create: bool = True) -> sqlite3.Connection:
    """Create the file owner-only before SQLite opens it (its -wal/-shm files inherit the mode);
    with `create=False` only open it, and raise `StoreMissing` when it is not there.

    `synchronous=FULL`: what we commit (a receipted message, a revocation) survives a crash.
    Autocommit mode: writes go through `transaction()`. The connection may be used from any
    thread, one thread at a time (the caller's lock).
    """
    if create:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    else:
        must_exist(path)
    # mode=rw: SQLite itself never creates the file (it would, were it gone meanwhile).
    uri = f"{path.absolute().as_uri()}?mode=rw"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    return db


@contextmanager
def transaction(db: sqlite3.Connection, lock: threading.Lock) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed whole, or rolled back on any error (the error goes on).

    `BEGIN IMMEDIATE` takes the database's write lock up front, so a writer in another process
    makes this one wait (up to the busy timeout) instead of failing half-way; `lock` keeps
    this process's other threads off the connection meanwhile.
    """
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite already rolled back after some errors (I/O, full)
                db.execute("ROLLBACK")
            raise
