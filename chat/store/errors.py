"""What goes wrong opening a store, said once for every tool that opens one."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StoreUnusable(Exception):
    """A store cannot be opened (not a directory, no permission, not a database): the
    tools report it as one line (exit 2), never a traceback."""


class StoreMissing(StoreUnusable):
    """A store that must already exist does not: an operator command acts on the state a
    server made, and making an empty one instead would report a success that did nothing."""


def must_exist(path: Path) -> None:
    """Raise `StoreMissing` when nothing is at `path` (an `OSError` for any other failure,
    such as a parent that is a file)."""
    try:
        path.stat()
    except FileNotFoundError:
        raise StoreMissing(f"{path} does not exist") from None


@contextmanager
def opening(what: str, path: Path) -> Iterator[None]:
    """Turn a failure to open `what` at `path` into `StoreUnusable` naming both."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnusable(f"cannot open {what} at {path}: {_reason(exc, path)}") from exc


def _reason(exc: OSError | sqlite3.Error, path: Path) -> str:
    if isinstance(exc, FileExistsError | NotADirectoryError):  # mkdir met a file on the way
        for place in (*reversed(path.parents), path):
            if place.exists() and not place.is_dir():
                return f"{place} is not a directory"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
