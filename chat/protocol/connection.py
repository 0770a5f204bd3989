"""One STOMP 1.2 connection as a state machine, sans-IO, for either end (as h11's `Connection`).

How this works: `receive_data(data, now)` feeds the codec (`chat.protocol.stomp.FrameParser`) and
queues the frames it completes; `next_event()` takes them one at a time, looks each up in
the state table for the frames the peer's role sends, checks the headers STOMP requires,
moves the state and returns a typed event (None: more data needed). `send(frame, now)`
looks the frame up in the table for our own role's frames and returns its bytes. Both
ends share the two tables below: what a client may send in each state is what a server
may receive, and the other way round.

Heart-beats (PROTOCOL.md §5) need only the times bytes moved: the shell passes `now`
(any monotonic clock, in seconds) and asks when our next heart-beat is due and whether the
peer has been silent for twice the agreed interval. Receipts we ask for are remembered
until the RECEIPT, or an ERROR naming them, comes back.

Failure is sticky: after a protocol error (the peer's or ours) the state is ERROR and every
later call raises that error again, except that we may still send the one ERROR frame
that reports it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from chat.protocol import events
from chat.protocol.errors import (
    LocalProtocolError,
    MalformedFrame,
    PolicyViolation,
    StompProtocolError,
)
from chat.protocol.stomp import (
    CLIENT_COMMANDS,
    HEARTBEAT,
    SERVER_COMMANDS,
    Frame,
    FrameParser,
    Limits,
    encode,
    negotiate_heartbeat,
    parse_heartbeat,
)
from chat.protocol.wire import STOMP_VERSIONS

SILENCE_FACTOR: Final = 2  # PROTOCOL.md §5: silent for twice the agreed interval means dead
MAX_PENDING_RECEIPTS: Final = 4096  # asked and unanswered: a peer that never answers is stuck


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    IDLE = "idle"  # nothing exchanged yet
    CONNECTING = "connecting"  # CONNECT sent or received, CONNECTED (or ERROR) awaited
    CONNECTED = "connected"
    CLOSING = "closing"  # DISCONNECT sent or received: its RECEIPT, if asked, comes last
    CLOSED = "closed"  # an ERROR went either way, or the DISCONNECT was answered
    ERROR = "error"  # a protocol error: sticky


class NotConnected(PolicyViolation):
    """STOMP 1.2 "Connecting": the first frame must be CONNECT or STOMP."""


# The RECEIPT that answers the DISCONNECT: the last frame of a session.
DISCONNECT_RECEIPT: Final = "RECEIPT(DISCONNECT)"

IDLE, CONNECTING, CONNECTED, CLOSING, CLOSED, ERROR = State

# STOMP 1.2 "Client Frames": state -> command -> next state. A command missing from a
# state's row may not be sent (by us) or received (from the peer) in that state.
_SESSION_COMMANDS = ("SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT")
CLIENT_FRAMES: Final[dict[State, dict[str, State]]] = {
    IDLE: {"CONNECT": CONNECTING, "STOMP": CONNECTING},
    CONNECTED: {**dict.fromkeys(_SESSION_COMMANDS, CONNECTED), "DISCONNECT": CLOSING},
}
# STOMP 1.2 "Server Frames"; an ERROR may come at any time and ends the session.
SERVER_FRAMES: Final[dict[State, dict[str, State]]] = {
    IDLE: {"ERROR": CLOSED},
    CONNECTING: {"CONNECTED": CONNECTED, "ERROR": CLOSED},
    CONNECTED: {"MESSAGE": CONNECTED, "RECEIPT": CONNECTED, "ERROR": CLOSED},
    CLOSING: {"MESSAGE": CLOSING, "RECEIPT": CLOSING, DISCONNECT_RECEIPT: CLOSED, "ERROR": CLOSED},
    ERROR: {"ERROR": CLOSED},  # only as ours: the one frame that reports the peer's error
}
FRAMES: Final = {Role.CLIENT: CLIENT_FRAMES, Role.SERVER: SERVER_FRAMES}  # what each role sends
_COMMANDS: Final = {Role.CLIENT: CLIENT_COMMANDS, Role.SERVER: SERVER_COMMANDS}
_PEER: Final = {Role.CLIENT: Role.SERVER, Role.SERVER: Role.CLIENT}

# Headers STOMP 1.2 requires, checked in this order both ways. CONNECTED's `version` is
# not required: a 1.0 server omits it. ACK, NACK and transactions are left to the caller.
REQUIRED_HEADERS: Final[dict[str, tuple[str, ...]]] = {
    "SEND": ("destination",),
    "SUBSCRIBE": ("destination", "id"),
    "UNSUBSCRIBE": ("id",),
    "MESSAGE": ("destination", "subscription", "message-id"),
    "RECEIPT": ("receipt-id",),
}


def _already_connected(command: str) -> StompProtocolError:
    return MalformedFrame("already connected", "CONNECT may only be sent once")


def _answer_first(command: str) -> Exception:
    """A server that reads on before answering CONNECT: the caller's mistake, not the peer's."""
    if command in ("CONNECT", "STOMP"):
        return _already_connected(command)
    return LocalProtocolError("answer CONNECT (CONNECTED or ERROR) before taking another frame")


def _unexpected(after: str) -> Callable[[str], StompProtocolError]:
    return lambda command: MalformedFrame(f"unexpected {command} {after}")


# What a frame the table refuses from the peer is called: (peer's role, our state) -> error.
_REFUSALS: Final[dict[tuple[Role, State], Callable[[str], Exception]]] = {
    (Role.CLIENT, IDLE): lambda command: NotConnected(
        "not connected", f"expected CONNECT, got {command}"
    ),
    (Role.CLIENT, CONNECTING): _answer_first,
    (Role.CLIENT, CONNECTED): _already_connected,
    (Role.CLIENT, CLOSING): _unexpected("after DISCONNECT"),
    (Role.CLIENT, CLOSED): _unexpected("after the session ended"),
    (Role.SERVER, IDLE): _unexpected("before CONNECT"),
    (Role.SERVER, CONNECTING): lambda command: MalformedFrame(f"expected CONNECTED, got {command}"),
    (Role.SERVER, CONNECTED): _unexpected("after CONNECTED"),
    (Role.SERVER, CLOSING): _unexpected("after DISCONNECT"),
    (Role.SERVER, CLOSED): _unexpected("after the session ended"),
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds on what one connection holds for its peer."""

    frames: Limits = Limits()  # one incoming frame: size and header count
    max_pending_receipts: int = MAX_PENDING_RECEIPTS


class StompConnection:
    """The protocol state of one STOMP connection, for `role`, doing no I/O.

    `versions` are the STOMP versions we speak, best first (a server negotiates among them).
    """

    def __init__(
        self,
        role: Role,
        *,
        limits: ConnectionLimits = ConnectionLimits(),
        versions: tuple[str, ...] = STOMP_VERSIONS,
    ) -> None:
        self.role = role
        self._limits = limits
        self._versions = versions
        self._peer_role = _PEER[role]
        self._ours, self._theirs = FRAMES[role], FRAMES[self._peer_role]
        self._parser = FrameParser(limits.frames, commands=_COMMANDS[self._peer_role])
        self._state = IDLE
        self._error: Exception | None = None
        self._failed_frame: Frame | None = None
        self._frames: deque[Frame] = deque()
        self._parse_error: StompProtocolError | None = None
        self._receipts: dict[str, str] = {}  # receipt id we asked for -> its frame's command
        self._disconnect_receipt: str | None = None
        self._offers: dict[Role, tuple[int, int]] = {}  # heart-beat offers, as each side sent
        self._heartbeat = (0, 0)
        self._last_sent: float | None = None
        self._last_received: float | None = None
        self._readers: dict[str, Callable[[Frame], events.Event]] = {
            "CONNECT": self._read_connect,
            "STOMP": self._read_connect,
            "SEND": lambda f: events.Send(f, f.require("destination")),
            "SUBSCRIBE": lambda f: events.Subscribe(
                f, f.require("destination"), f.require("id"), _ack_mode(f)
            ),
            "UNSUBSCRIBE": lambda f: events.Unsubscribe(f, f.require("id")),
            "DISCONNECT": self._read_disconnect,
            "ACK": events.Ack,
            "NACK": events.Nack,
            "BEGIN": events.Begin,
            "COMMIT": events.Commit,
            "ABORT": events.Abort,
            "CONNECTED": self._read_connected,
            "MESSAGE": lambda f: events.Message(
                f, f.require("destination"), f.require("subscription"), f.require("message-id")
            ),
            "RECEIPT": self._read_receipt,
            "ERROR": self._read_error,
        }

    # ------------------------------------------------------------ state

    @property
    def state(self) -> State:
        return self._state

    @property
    def failed_frame(self) -> Frame | None:
        """The frame that broke the protocol, if a frame did (not unparseable bytes): the
        ERROR that reports it names its receipt (STOMP 1.2 "ERROR")."""
        return self._failed_frame

    @property
    def pending_receipts(self) -> dict[str, str]:
        """Receipt ids we asked for and have no answer to yet, with their frames' commands."""
        return dict(self._receipts)

    # ------------------------------------------------------------ bytes in, events out

    def receive_data(self, data: bytes, now: float) -> None:
        """Buffer the peer's bytes (heart-beats included); take the events with `next_event()`."""
        self._check_usable()
        if data:
            self._last_received = now
        if self._parse_error is not None:
            return
        try:
            self._frames.extend(self._parser.feed(data))
        except StompProtocolError as exc:
            self._parse_error = exc  # raised by next_event() once the frames before it are taken

    def next_event(self) -> events.Event | None:
        """The next frame the peer sent, as an event; None until more data completes one.

        Raises the `StompProtocolError` the frame (or the bytes) break, and keeps raising it.
        """
        self._check_usable()
        if not self._frames:
            if self._parse_error is not None:
                raise self._fail(self._parse_error)
            return None
        frame = self._frames.popleft()
        try:
            following = self._transition(self._theirs, frame)
            if following is None:
                raise _REFUSALS[(self._peer_role, self._state)](frame.command)
            _check_headers(frame)
            event = self._readers[frame.command](frame)
        except (StompProtocolError, LocalProtocolError) as exc:
            self._failed_frame = frame
            raise self._fail(exc) from None
        self._state = following
        return event

    # ------------------------------------------------------------ events out, bytes out

    def send(self, frame: Frame | events.Event, now: float | None = None) -> bytes:
        """The wire bytes of `frame` (an event sends its frame), if our role may send it now.

        `now`: when they leave, if at once; None when they are queued and `data_sent()`
        will say. Raises `LocalProtocolError` when it may not (the connection is then unusable).
        """
        frame = frame.frame if isinstance(frame, events.Event) else frame
        following = self._transition(self._ours, frame)
        if following is None:
            self._check_usable()
        try:
            if following is None:
                raise LocalProtocolError(
                    f"cannot send {frame.command} in state {self._state.value} as the "
                    f"{self.role.value}"
                )
            self._check_outgoing(frame)
        except LocalProtocolError as exc:
            raise self._fail(exc) from None
        self._state = following
        if now is not None:
            self._last_sent = now
        return encode(frame)

    def send_heartbeat(self, now: float) -> bytes:
        """A heart-beat (one EOL), once the session is up; resets when the next one is due."""
        self._check_usable()
        if self._state not in (CONNECTED, CLOSING):
            raise self._fail(LocalProtocolError(f"no heart-beat in state {self._state.value}"))
        self._last_sent = now
        return HEARTBEAT

    def data_sent(self, now: float) -> None:
        """Record that bytes went out: queued frames, a server's pre-encoded fan-out."""
        self._last_sent = now

    def data_received(self, now: float) -> None:
        """Record that the peer was heard outside STOMP (a WebSocket ping, say)."""
        self._last_received = now

    def data_withheld(self, until: float) -> None:
        """We leave the peer's bytes unread until `until` (throttling it): what it sent
        meanwhile, heart-beats included, counts as heard then, so it is not silent for it."""
        self._last_received = max(until, self._last_received or until)

    # ------------------------------------------------------------ heart-beats

    @property
    def heartbeat(self) -> tuple[int, int]:
        """Negotiated (our send interval, the peer's expected interval) in ms; 0 is none."""
        return self._heartbeat

    def next_heartbeat(self) -> float | None:
        """When we must send something (a heart-beat if nothing else); None: never."""
        send_ms = self._heartbeat[0]
        if not send_ms or self._last_sent is None:
            return None
        return self._last_sent + send_ms / 1000

    def silence_deadline(self) -> float | None:
        """When the peer counts as dead if it sends nothing before; None: never."""
        expect_ms = self._heartbeat[1]
        if not expect_ms or self._last_received is None:
            return None
        return self._last_received + SILENCE_FACTOR * expect_ms / 1000

    def peer_silent(self, now: float) -> bool:
        """The peer has sent nothing for twice the agreed interval (PROTOCOL.md §5)."""
        deadline = self.silence_deadline()
        return deadline is not None and now >= deadline

    def next_deadline(self, now: float) -> float | None:
        """When heart-beats next need a look (ours due, or the peer silent); None: never.

        Before our first bytes leave (a CONNECTED still queued), ours cannot fall due sooner
        than one interval from `now`: looking then is early, never late.
        """
        ours = self.next_heartbeat()
        if ours is None and self._heartbeat[0]:
            ours = now + self._heartbeat[0] / 1000
        return min((d for d in (ours, self.silence_deadline()) if d is not None), default=None)

    # ------------------------------------------------------------ inside

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, error: Exception) -> Exception:
        """Enter the sticky ERROR state; returns `error` for the caller to raise."""
        if self._error is None:
            self._error = error
            self._state = ERROR
        return error

    def _transition(self, table: dict[State, dict[str, State]], frame: Frame) -> State | None:
        key = frame.command
        answers = self._disconnect_receipt
        if key == "RECEIPT" and answers is not None and frame.get("receipt-id") == answers:
            key = DISCONNECT_RECEIPT
        return table.get(self._state, {}).get(key)

    def _check_outgoing(self, frame: Frame) -> None:
        """Headers, receipts and heart-beat offers of a frame we send."""
        try:
            _check_headers(frame)
            if frame.command in ("CONNECT", "STOMP", "CONNECTED"):
                self._offer(self.role, frame)
        except StompProtocolError as exc:
            raise LocalProtocolError(f"{frame.command}: {exc.message}") from exc
        receipt = frame.get("receipt")
        if receipt is not None:
            self._expect_receipt(receipt, frame.command)
        if frame.command == "DISCONNECT":
            self._disconnect_receipt = receipt

    def _expect_receipt(self, receipt: str, command: str) -> None:
        if receipt in self._receipts:
            raise LocalProtocolError(f"receipt id {receipt!r} is already awaited")
        if len(self._receipts) >= self._limits.max_pending_receipts:
            raise LocalProtocolError(
                f"over {self._limits.max_pending_receipts} receipts are unanswered"
            )
        self._receipts[receipt] = command

    def _offer(self, role: Role, frame: Frame) -> None:
        """Record a side's heart-beat offer; with both in, the intervals are agreed."""
        self._offers[role] = parse_heartbeat(frame.get("heart-beat"))
        if len(self._offers) == 2:
            theirs = self._offers[self._peer_role]
            self._heartbeat = negotiate_heartbeat(self._offers[self.role], theirs)

    def _read_connect(self, frame: Frame) -> events.Connect:
        version = negotiate_version(frame.get("accept-version"), self._versions)
        self._offer(Role.CLIENT, frame)
        return events.Connect(frame, version, frame.get("host"), self._offers[Role.CLIENT])

    def _read_disconnect(self, frame: Frame) -> events.Disconnect:
        self._disconnect_receipt = frame.get("receipt")
        return events.Disconnect(frame)

    def _read_connected(self, frame: Frame) -> events.Connected:
        self._offer(Role.SERVER, frame)
        return events.Connected(
            frame,
            frame.get("version"),
            frame.get("session"),
            frame.get("server"),
            frame.get("user-name"),
            self._heartbeat,
        )

    def _read_receipt(self, frame: Frame) -> events.Receipt:
        receipt_id = frame.require("receipt-id")
        command = self._receipts.pop(receipt_id, None)
        if command is None:
            raise MalformedFrame(f"RECEIPT for {receipt_id[:40]!r}, which was never asked for")
        return events.Receipt(frame, receipt_id, command)

    def _read_error(self, frame: Frame) -> events.Error:
        receipt_id = frame.get("receipt-id")
        failed = self._receipts.pop(receipt_id, None) if receipt_id is not None else None
        detail = frame.body.decode("utf-8", "replace")
        return events.Error(frame, frame.get("message") or "error", detail, receipt_id, failed)


def _ack_mode(frame: Frame) -> str:
    ack = frame.get("ack")
    return "auto" if ack is None else ack  # STOMP 1.2 "SUBSCRIBE": auto by default


def _check_headers(frame: Frame) -> None:
    for name in REQUIRED_HEADERS.get(frame.command, ()):
        frame.require(name)


def negotiate_version(accept_version: str | None, versions: tuple[str, ...]) -> str:
    """STOMP 1.2 "Protocol Negotiation": the best of `versions` the client accepts.

    A CONNECT without `accept-version` is a STOMP 1.0 client.
    """
    offered = {v.strip() for v in (accept_version or "1.0").split(",")}
    for version in versions:
        if version in offered:
            return version
    raise PolicyViolation(
        "unsupported STOMP version",
        f"supported versions are {','.join(versions)}; offered {accept_version}",
    )
