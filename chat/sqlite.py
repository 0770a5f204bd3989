"""The one way this project opens an SQLite file: owner-only, WAL, durable commits."""

from __future__ import annotations

import os
import sqlite3
from contextlib import suppress
from pathlib import Path

FILE_MODE = 0o600  # tokens' hashes, revocations, message bodies: owner only
DIR_MODE = 0o700
BUSY_TIMEOUT_MS = 5000  # how long a write waits for another process's transaction


def open_private(path: Path) -> sqlite3.Connection:
    """Create the file owner-only before SQLite opens it (its -wal/-shm files inherit the mode).

    `synchronous=FULL`: what we commit (a receipted message, a revocation) survives a crash.
    Autocommit mode: callers open their own `BEGIN IMMEDIATE` transactions.
    """
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    return db
