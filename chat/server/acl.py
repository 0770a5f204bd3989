"""The policy file (PROTOCOL.md §9): found, written with the default policy on first start,
loaded, and re-read when it changes.

How this works: `PolicyFile.open` runs before serving (a missing `--acl` file, or one with an
error, stops the start with the `PolicyError`'s one line). While serving, the server calls
`changed()` and `reload()` on a storage lane, never on the event loop; a change is noticed by
the file's stamp (inode, size, modification time), so an editor's rename counts too. A reload
that fails keeps the previous policy in force and remembers the stamp, so each broken version
is reported once. Sessions read `current` and compare the `Rights` it gives them with the
ones they hold, which is how a change reaches every live subscription.
"""

from __future__ import annotations

from pathlib import Path

from chat.protocol.policy import DEFAULT_POLICY, Policy, PolicyError
from chat.store.files import Stamp, stamp, write_atomic

DEFAULT_FILE = "acl.toml"  # in the state directory, when --acl is not given
POLICY_MODE = 0o644  # the operator reads and edits it; it holds no secret


class PolicyFile:
    """The policy in force and the file it came from."""

    def __init__(self, path: Path, policy: Policy, seen: Stamp) -> None:
        self.path = path
        self.current = policy
        self._stamp = seen

    @classmethod
    def open(cls, configured: Path | None, state_dir: Path) -> PolicyFile:
        """Load `configured`, or STATE_DIR/acl.toml, written with the default when absent.

        Raises PolicyError (one line naming the file) when the file is missing or wrong.
        """
        path = configured or state_dir / DEFAULT_FILE
        if configured is None:
            _write_default(path)
        seen = stamp(path)
        return cls(path, Policy.load(path), seen)

    def changed(self) -> bool:
        """Whether the file differs from the version last loaded (or tried). Blocking."""
        return stamp(self.path) != self._stamp

    def reload(self) -> Policy:
        """Load the file as it is now; on a PolicyError the previous policy stays. Blocking."""
        self._stamp = stamp(self.path)
        self.current = Policy.load(self.path)
        return self.current


def _write_default(path: Path) -> None:
    try:
        write_atomic(path, DEFAULT_POLICY.encode(), mode=POLICY_MODE, exclusive=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise PolicyError(f"{path}: cannot write the default policy: {exc.strerror}") from None
