"""What a `StompConnection` reports: one typed event per frame the peer sent.

Each event keeps the whole `frame` (every header, in wire order) and names, checked, the
headers STOMP 1.2 requires of that command. Events of the client's frames are what a server
reads; events of the server's frames are what a client reads. Heart-beats are not events:
they only move the peer's last-heard time.
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.protocol.stomp import Frame


@dataclass(frozen=True, slots=True)
class Event:
    """A frame the peer sent, valid for the connection's state."""

    frame: Frame

    @property
    def receipt(self) -> str | None:
        """The receipt id the peer asked for with this frame (client frames), or None."""
        return self.frame.get("receipt")


# ---------------------------------------------------------------- a client's frames (server role)


@dataclass(frozen=True, slots=True)
class Connect(Event):
    """CONNECT or STOMP (`frame.command` says which); `version` is the one negotiated."""

    version: str
    host: str | None
    heartbeat: tuple[int, int]  # the client's offer: (can send every ms, wants every ms)


@dataclass(frozen=True, slots=True)
class Send(Event):
    destination: str


@dataclass(frozen=True, slots=True)
class Subscribe(Event):
    destination: str
    id: str
    ack: str  # "auto" unless the frame says otherwise


@dataclass(frozen=True, slots=True)
class Unsubscribe(Event):
    id: str


@dataclass(frozen=True, slots=True)
class Disconnect(Event):
    """The client is leaving; its `receipt`, if any, is the last frame it expects."""


@dataclass(frozen=True, slots=True)
class Ack(Event):
    """ACK (client acknowledgement modes). Headers unchecked: a server may refuse the mode."""


@dataclass(frozen=True, slots=True)
class Nack(Event):
    """NACK; as `Ack`."""


@dataclass(frozen=True, slots=True)
class Begin(Event):
    """BEGIN (transactions). Headers unchecked: a server may refuse transactions."""


@dataclass(frozen=True, slots=True)
class Commit(Event):
    """COMMIT; as `Begin`."""


@dataclass(frozen=True, slots=True)
class Abort(Event):
    """ABORT; as `Begin`."""


# ---------------------------------------------------------------- a server's frames (client role)


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """CONNECTED; `heartbeat` is the negotiated (send every ms, expect every ms), 0 for none."""

    version: str | None
    session: str | None
    server: str | None
    user_name: str | None
    heartbeat: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Message(Event):
    destination: str
    subscription: str
    message_id: str


@dataclass(frozen=True, slots=True)
class Receipt(Event):
    """A RECEIPT for a frame we sent; `command` is that frame's command."""

    receipt_id: str
    command: str


@dataclass(frozen=True, slots=True)
class Error(Event):
    """ERROR: the peer ends the session. `receipt_id` names the receipt it fails, if any,
    `failed` the command we sent with it."""

    message: str
    detail: str
    receipt_id: str | None
    failed: str | None
