"""Which connections the server holds: a bound on all of them and on handshakes in progress.

How this works: every accepted socket `arrive`s with a handle (the shell's ticket: its
handler's cancel scope and its file) and is unfinished until `opened` (TLS done and the
request head read), then a connection until it has `left`. An unfinished socket that has
sent nothing yet costs the server one file and an idle task; once it has `started` (its
first bytes: a TLS handshake or a request head in progress) it costs TLS state, so
handshakes in progress have their own, smaller bound. Idle sockets held against the port
(PROTOCOL.md §12) must not keep healthy clients out, so a newcomer is never the one
refused while some socket is unfinished: at `max_connections` the oldest idle socket is
shed for it (else the oldest handshake in progress), beyond `max_handshakes` the oldest
handshake in progress (their handles are returned for the shell to close). Only when
every connection is past its handshake is a newcomer refused. Holding idle sockets rather
than shedding them at once matters: each one shed is re-opened by a persistent attacker,
and the kernel's accept queue then fills with them, ahead of the healthy clients.

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
# databases with their journals, logs, certificate reloads (accepted sockets are counted
# as connections at once, and a refused or shed one is closed at once).
FILE_RESERVE = 128
MIN_CONNECTIONS = 16  # below this the server cannot serve a handful of clients: refuse to start


@dataclass(frozen=True, slots=True)
class Arrival(Generic[H]):
    """What becomes of a newcomer: `admitted`, and the unfinished sockets to close for it."""

    admitted: bool
    shed: tuple[H, ...] = ()


class Admission(Generic[H]):
    """Counts connections, idle ones and handshakes in progress (each oldest first), and
    picks what to shed."""

    def __init__(self, max_connections: int, max_handshakes: int) -> None:
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self._connections: set[H] = set()
        self._idle: OrderedDict[H, None] = OrderedDict()  # arrived, nothing sent yet
        self._handshakes: OrderedDict[H, None] = OrderedDict()  # in the order they started
        self.shed_total = 0  # unfinished sockets shed since start
        self.refused_total = 0  # newcomers refused (every connection established) since start

    @property
    def connections(self) -> int:
        """Sockets held, unfinished ones included."""
        return len(self._connections)

    @property
    def unfinished(self) -> int:
        return len(self._idle) + len(self._handshakes)

    @property
    def handshakes(self) -> int:
        """Unfinished sockets that have sent something."""
        return len(self._handshakes)

    def arrive(self, handle: H) -> Arrival[H]:
        """A socket was accepted: admit it, shedding the oldest unfinished one (an idle one
        first: it has shown no sign of life) if the connections are at their bound, or
        refuse it when every one is established."""
        shed: tuple[H, ...] = ()
        if len(self._connections) >= self.max_connections:
            oldest = self._idle or self._handshakes
            if not oldest:
                self.refused_total += 1
                return Arrival(admitted=False)
            shed = (self._shed(next(iter(oldest))),)
        self._connections.add(handle)
        self._idle[handle] = None
        return Arrival(admitted=True, shed=shed)

    def started(self, handle: H) -> tuple[H, ...]:
        """Its first bytes arrived: a handshake in progress. Returns the older ones shed
        to stay within `max_handshakes`."""
        if handle not in self._idle:  # shed already
            return ()
        del self._idle[handle]
        self._handshakes[handle] = None
        shed: list[H] = []
        while len(self._handshakes) > self.max_handshakes:
            oldest, _ = self._handshakes.popitem(last=False)
            shed.append(self._shed(oldest))
        return tuple(shed)

    def opened(self, handle: H) -> None:
        """Its handshake and request head are done: no longer one to shed."""
        self._idle.pop(handle, None)
        self._handshakes.pop(handle, None)

    def left(self, handle: H) -> None:
        """Its socket is closed (a shed one was forgotten already)."""
        self._forget(handle)

    def _shed(self, handle: H) -> H:
        self.shed_total += 1
        return self._forget(handle)

    def _forget(self, handle: H) -> H:
        self._connections.discard(handle)
        self._idle.pop(handle, None)
        self._handshakes.pop(handle, None)
        return handle


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


@dataclass(frozen=True, slots=True)
class FileLimit:
    """The soft file limit once raised (None: unlimited), what it was, and the connections
    that fit under it."""

    soft: int | None
    was: int | None
    connections: int

    def report(self, max_connections: int) -> None:
        """Log it once the server listens (not before: an error at start stays one line)."""
        if self.soft is None:
            log.info("file limit: unlimited", extra={"event": "file_limit"})
            return
        raised = f" (raised from {self.was})" if self.was != self.soft else ""
        log.info(
            "file limit: %d open files%s",
            self.soft,
            raised,
            extra={"event": "file_limit", "files": self.soft, "was": self.was},
        )
        if self.connections < max_connections:
            log.warning(
                "--max-connections %d does not fit the file limit of %d open files: serving "
                "at most %d connections (raise the limit with ulimit -n)",
                max_connections,
                self.soft,
                self.connections,
                extra={
                    "event": "file_limit_too_low",
                    "max_connections": max_connections,
                    "files": self.soft,
                    "connections": self.connections,
                },
            )


def fit_file_limit(max_connections: int) -> FileLimit:
    """Raise the soft file limit to the hard one, and fit `max_connections` under it."""
    was, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = was
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit can exceed the kernel's cap
            pass
    if soft == resource.RLIM_INFINITY:
        return FileLimit(None, None, max_connections)
    return FileLimit(soft, was, connections_within(soft, max_connections))
