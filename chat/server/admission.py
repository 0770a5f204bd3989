"""Which connections the server holds: a bound on all of them and on unfinished handshakes.

How this works: every accepted socket `arrive`s with a handle (the shell's cancel scope)
and is an unfinished handshake until `opened` (TLS done and the request head read), then
a connection until it has `left`. Idle sockets held against the port (PROTOCOL.md §12)
must not keep healthy clients out, so a newcomer is never the one refused while some
handshake is unfinished: when handshakes exceed `max_handshakes`, or connections exceed
`max_connections`, the oldest unfinished handshake is shed (its handle is returned for the
shell to close). Only when every connection is past its handshake is a newcomer refused.

The number of connections is also bounded by the process's file limit: `fit_file_limit`
raises the soft limit to the hard one and says how many connections fit beside the files
the server needs for itself, so accepting never fails with EMFILE.
"""

from __future__ import annotations

import logging
import resource
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from chat.server.config import ConfigError

log = logging.getLogger("chat.server")

H = TypeVar("H", bound=Hashable)

# Descriptors the server needs beside its connections: listeners, the event loop, SQLite
# databases with their journals, worker threads, logs, certificate reloads.
FILE_RESERVE = 128
MIN_CONNECTIONS = 16  # below this the server cannot serve a handful of clients: refuse to start


@dataclass(frozen=True, slots=True)
class Arrival(Generic[H]):
    """What becomes of a newcomer: `admitted`, and the unfinished handshakes to close for it."""

    admitted: bool
    shed: tuple[H, ...] = ()


class Admission(Generic[H]):
    """Counts connections and unfinished handshakes (oldest first), and picks what to shed."""

    def __init__(self, max_connections: int, max_handshakes: int) -> None:
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self._handshakes: OrderedDict[H, None] = OrderedDict()  # arrival order
        self._connections: set[H] = set()

    @property
    def connections(self) -> int:
        """Sockets held, unfinished handshakes included."""
        return len(self._connections)

    @property
    def handshakes(self) -> int:
        return len(self._handshakes)

    def arrive(self, handle: H) -> Arrival[H]:
        """A socket was accepted: admit it as an unfinished handshake, shedding older ones to
        stay within both bounds, or refuse it when every slot is an established connection."""
        if len(self._connections) >= self.max_connections and not self._handshakes:
            return Arrival(admitted=False)
        self._connections.add(handle)
        self._handshakes[handle] = None
        shed: list[H] = []
        while (
            len(self._handshakes) > self.max_handshakes
            or len(self._connections) > self.max_connections
        ):
            oldest, _ = self._handshakes.popitem(last=False)
            self._connections.discard(oldest)
            shed.append(oldest)
        return Arrival(admitted=True, shed=tuple(shed))

    def opened(self, handle: H) -> None:
        """Its handshake and request head are done: no longer one to shed."""
        self._handshakes.pop(handle, None)

    def left(self, handle: H) -> None:
        """Its socket is closed (a shed one was forgotten already)."""
        self._handshakes.pop(handle, None)
        self._connections.discard(handle)


def connections_within(file_limit: int, wanted: int) -> int:
    """How many of `wanted` connections fit under `file_limit` beside FILE_RESERVE; a limit
    that leaves fewer than MIN_CONNECTIONS is a ConfigError."""
    room = file_limit - FILE_RESERVE
    if room < MIN_CONNECTIONS:
        raise ConfigError(
            f"the file limit ({file_limit}) leaves room for {max(room, 0)} connections, "
            f"fewer than {MIN_CONNECTIONS}; raise it (ulimit -n)"
        )
    return min(wanted, room)


def fit_file_limit(max_connections: int) -> int:
    """Raise the soft file limit to the hard one, then the connections that fit under it
    (a warning when that is fewer than `max_connections`)."""
    was, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = was
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit can exceed the kernel's cap
            pass
    if soft == resource.RLIM_INFINITY:
        log.info("file limit: unlimited")
        return max_connections
    raised = f" (raised from {was})" if soft != was else ""
    log.info("file limit: %d open files%s", soft, raised)
    fitted = connections_within(soft, max_connections)
    if fitted < max_connections:
        log.warning(
            "--max-connections %d does not fit the file limit of %d open files: serving at "
            "most %d connections (raise the limit with ulimit -n)",
            max_connections,
            soft,
            fitted,
        )
    return fitted
