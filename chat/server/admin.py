"""What the admin routes do (PROTOCOL.md §12): publish as an administrator, list the live
STOMP connections, end an identity's connections.

HttpApi parses the requests and checks that the caller is an administrator; this module acts
on the server's state. A publish takes the session's path (`session.post`): its topics are
brought into memory first, as a connection does before it handles a frame, and the answer
waits until the message is durable, as a RECEIPT does. An administrator may publish to any
topic and message anyone: the policy's publish and message rules do not apply to it.
"""

from __future__ import annotations

import logging
from collections.abc import Set
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from chat.protocol.errors import InvalidDestination, PolicyViolation
from chat.protocol.topics import PRESENCE, parse_route
from chat.server.broker import Broker, Published
from chat.server.connection import Connection
from chat.server.session import post, stored_in
from chat.store.history import Stored

log = logging.getLogger("chat.server")


class DisconnectedByAdmin(PolicyViolation):
    """An administrator ended the connection (POST /admin/disconnect): ERROR + 1008."""


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """One live STOMP connection, as GET /admin/connections shows it."""

    sub: str
    peer: str  # the client's "ip:port"
    since: float  # when it opened, wall-clock seconds
    subscriptions: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        """`since` as ISO 8601 UTC to the second, e.g. "2026-12-01T18:50:43Z"."""
        opened = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "sub": self.sub,
            "peer": self.peer,
            "since": opened,
            "subscriptions": list(self.subscriptions),
        }


class Admin:
    """The server's connections and broker, as the admin routes reach them."""

    def __init__(self, connections: Set[Connection], broker: Broker) -> None:
        self._connections = connections
        self._broker = broker

    async def publish(
        self, sender: str, destination: str, body: bytes, content_type: str
    ) -> Stored:
        """Store and deliver a message from `sender` to `/topic/NAME` or `/user/NAME` (a direct
        message); returns the copy at `destination` once every copy is durable. Raises
        InvalidDestination, StorageUnavailable."""
        route = parse_route(destination, wildcards=False)
        if route.space == PRESENCE:
            raise InvalidDestination(f"cannot publish to {destination}: the server announces it")
        durability = self._broker.durability
        await durability.loaded(stored_in(destination, route, sender))
        # No checkpoint between loading the topics and storing the message.
        posted = post(self._broker, Published(destination, route, sender, content_type, body))
        durable = trio.Event()
        durability.after(posted.durable_seq, durable.set)
        await durable.wait()
        log.info(
            "admin %s published to %s",
            sender,
            destination,
            extra={"event": "admin_publish", "sub": sender, "destination": destination},
        )
        return posted.stored

    def connections(self) -> list[LiveConnection]:
        """Every live STOMP connection, oldest first."""
        live = [
            LiveConnection(c.session.identity, c.address, c.since, tuple(c.session.destinations()))
            for c in self._connections
        ]
        return sorted(live, key=lambda connection: (connection.since, connection.sub))

    def disconnect(self, admin: str, sub: str) -> int:
        """End every connection of `sub` with ERROR `disconnected by admin` and 1008; how
        many there were."""
        ending = [c for c in self._connections if c.session.identity == sub]
        for connection in ending:
            connection.fail(
                DisconnectedByAdmin(
                    "disconnected by admin", f"an administrator ({admin}) ended this connection"
                )
            )
        log.info(
            "admin %s disconnected %d connections of %s",
            admin,
            len(ending),
            sub,
            extra={
                "event": "admin_disconnect",
                "sub": admin,
                "target": sub,
                "connections": len(ending),
            },
        )
        return len(ending)
