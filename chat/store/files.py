"""The one way this project writes a file: whole, with its mode from the first byte, or not at all.

How this works: the data goes to a new temporary file beside the target (created with
O_EXCL and the target's mode, so nobody else can open it even for a moment), is flushed to
the disk, and only then gets the target's name: `os.replace` swaps it in (a reader sees the
old file or the new one, never a part), or, in exclusive mode, `os.link` gives it the name
only if that name is free (an existing file is never overwritten, as with O_EXCL). The
directory is synced last, so the new name survives a crash too. BLOCKING: fsync.
"""

from __future__ import annotations

import os
import secrets
from contextlib import suppress
from pathlib import Path

PRIVATE_MODE = 0o600  # keys, tokens: owner only unless a caller says otherwise
TEMP_SUFFIX_BYTES = 4  # random hex in a temporary name: two writers never pick the same one


def write_atomic(
    path: Path, data: bytes, *, mode: int = PRIVATE_MODE, exclusive: bool = False
) -> None:
    """Make `path` hold exactly `data`, with `mode` (less the umask).

    With `exclusive`, raises `FileExistsError` when `path` exists (and leaves it alone).
    Any other failure raises `OSError` and leaves `path` as it was, with no temporary behind.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(TEMP_SUFFIX_BYTES)}.tmp")
    try:
        _write_new(temporary, data, mode)
        if exclusive:
            os.link(temporary, path)  # atomic, and refuses a name that exists
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # after a link (or a failure); gone after a replace
    _sync_directory(path.parent)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _sync_directory(directory: Path) -> None:
    """Make the new name durable; a filesystem that cannot sync a directory keeps the file."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


Stamp = tuple[int, int, int, int] | None  # (device, inode, size, mtime in ns); None: missing


def stamp(path: Path) -> Stamp:
    """What changes when a file is rewritten or replaced by a rename: a watcher compares it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
