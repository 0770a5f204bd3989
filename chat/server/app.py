"""The server: one TLS listener, HTTP routing with h11, WebSocket STOMP with wsproto.

How this works: the accept loop and the connection handlers live in separate nurseries.
Each handler does the TLS handshake, then hands the stream and the `Peer` it established to
`serve_stream`, which reads the request head (under the same timeout as the handshake) and
either answers a plain HTTP route or upgrades to a `Connection`; `serve_stream` takes any
`trio.abc.Stream`, so the layers above TLS also run over a memory stream. Every connection
is counted by `Admission` from its arrival: until its request head is read it is
unfinished and a newcomer may shed it (admission.py), so idle sockets held against the port
never keep healthy clients out; the TLS state is made only once the first bytes arrive.
A failure in one handler ends only that connection. The wall clock (token issue and
expiry, timestamps, retention) is the `clock` the server is given. Shutdown stops
accepting, asks every connection to close with 1001, and cancels what is left after the
grace period. Storage is opened once, before serving; from then on it is called only
through the stores' lanes (`storage.py`), and the upgrade and every live session check
revocations against the state store's snapshot, which two background tasks keep fresh: one
polls the revocation counter, one the key directory (each in its own lane, so a locked key
directory never delays a revocation). A third watches the TLS files (`tls.py`): new
handshakes get a context built from the files as they are, and the live connections whose
certificate a new CRL revokes end. With `--metrics`, a plain-HTTP listener serves the
Prometheus metrics (metrics.py) from the same nursery as those tasks. With `--proxy-listen`,
a plain-HTTP listener serves what the TLS listener does, for a TLS-terminating proxy: there
the `Peer` comes from the request's forwarded certificate (proxy.py) instead of a handshake.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TypeAlias

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection
from wsproto.utilities import RemoteProtocolError as WsProtocolError

from chat import pki
from chat.history import History
from chat.protocol.errors import CloseCode, HttpRefusal
from chat.protocol.policy import PolicyError
from chat.protocol.stomp import FrameParser, Limits
from chat.protocol.tokens import Claims, TokenAuthority, TokenPolicy, TrustedIssuer
from chat.protocol.wire import WS_PATH
from chat.server.acl import PolicyFile
from chat.server.admin import Admin
from chat.server.admission import Admission, fit_file_limit
from chat.server.broker import Broker
from chat.server.config import ServerConfig
from chat.server.connection import Connection, Ending, Outbox
from chat.server.durability import Durability
from chat.server.http_api import (
    BadRequest,
    HttpApi,
    Peer,
    Request,
    Response,
    Vitals,
    refusal_response,
)
from chat.server.metrics import OK, TLS_FAILED, Metrics, Stats, serve_metrics
from chat.server.presence import Presence
from chat.server.proxy import ProxyGate
from chat.server.refusals import LogRate, refusal_reason
from chat.server.session import SessionLimits, Shared, StompSession
from chat.server.storage import Lane, StorageUnavailable
from chat.server.tls import TlsContexts
from chat.server.upgrade import BadHandshake, IdentitySlots, Upgrade, authorize, is_upgrade
from chat.store.history import Retention
from chat.store.keys import KeyStore
from chat.store.state import StateStore

log = logging.getLogger("chat.server")

TlsStream: TypeAlias = trio.SSLStream[trio.SocketStream]  # what the accept loop hands on
Identify: TypeAlias = Callable[[Request], Peer]  # who sent a request; raises an HttpRefusal
Serve: TypeAlias = Callable[[trio.SocketStream, "Ticket"], Awaitable[None]]

MAX_REQUEST_HEAD = 16 * 1024  # request line + headers; a bearer token fits easily
MAX_REQUEST_BODY = 16 * 1024  # token endpoints take tiny JSON bodies
HEAD_LIMIT = f"request line and headers are limited to {MAX_REQUEST_HEAD} bytes"
PRUNE_INTERVAL = 60.0  # how often retired signing keys and dead refresh tokens are swept
# A socket that has sent nothing yet costs a file and an idle task, and is shed first when
# connections run out; closing it sooner only makes a persistent attacker open it again,
# ahead of healthy clients in the kernel's accept queue (measured: healthy clients waited
# 3-8 s behind each wave of 10,000 re-opened every 10 s). Such sockets time out spread
# over the last IDLE_SPREAD of IDLE_TIMEOUT, so a flood opened at once does not return at once.
IDLE_TIMEOUT = 60.0
IDLE_SPREAD = 0.5
ACCEPT_BATCH = 64  # connections accepted per wake-up of the accept loop
ACCEPT_PAUSE = 0.1  # after accept ran out of files or memory: let connections close first
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# `chat-certs rotate-server` replaces the key, then the certificate: once a change is seen,
# wait this long so that both have landed before they are read (else one poll logs a mismatch)
TLS_SETTLE = 0.2
# Refused TLS handshakes: this many lines per window, then one summary line per window
REFUSAL_LINES = 10
REFUSAL_WINDOW = 1.0


class BodyTooLarge(HttpRefusal):
    status = 413
    code = "body_too_large"


class RequestHeadTooLarge(HttpRefusal):
    status = 431  # RFC 6585: Request Header Fields Too Large
    code = "request_head_too_large"


class Ticket:
    """A connection's place in `Admission`. Shedding it cancels its handler and, for a
    socket, closes the file at once: the handler may run only after many more arrivals,
    and the file limit must hold meanwhile."""

    __slots__ = ("_release", "scope")

    def __init__(self, release: Callable[[], None] | None = None) -> None:
        self.scope = trio.CancelScope()
        self._release = release

    def shed(self) -> None:
        self.scope.cancel()
        if self._release is not None:
            self._release()


class ChatServer:
    """Owns the listener, the shared state and every live connection.

    `clock` is the wall clock in seconds (tokens, expiry, timestamps, retention); `lane`
    makes each store's `Lane` (by default worker threads).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.time,
        lane: Callable[[], Lane] = Lane,
    ) -> None:
        self.config = config
        self.clock = clock
        self.file_limit = fit_file_limit(config.max_connections)
        self.admission: Admission[Ticket] = Admission(
            self.file_limit.connections, config.max_handshakes
        )
        self.tls = TlsContexts(config)
        self.proxy = ProxyGate(config.trusted_proxy, self.tls, clock)
        self.keys = KeyStore.open(config.state_dir / "keys")
        trusted = [TrustedIssuer.from_jwks_file(path, iss) for path, iss in config.trusted_jwks]
        self.authority = TokenAuthority(
            self.keys,
            TokenPolicy(
                issuer=config.issuer,
                lifetime=config.token_lifetime,
                leeway=config.clock_leeway,
            ),
            trusted,
        )
        self.state = StateStore.open(config.state_dir / "state.db")
        self.policy = PolicyFile.open(config.acl, config.state_dir)
        self.history = _open_history(config)
        self.keys_lane, self.state_lane, self.history_lane = lane(), lane(), lane()
        self.policy_lane, self.tls_lane = lane(), lane()
        self._reload_tls = trio.Event()
        self.durability = Durability(self.history, self.history_lane)
        self.broker = Broker(self.history, self.durability, clock)
        self.presence = Presence()
        self.connections: set[Connection] = set()
        self.stats = Stats()
        self.metrics = (
            Metrics(
                self.stats,
                self.broker,
                lambda: len(self.connections),
                {"server": config.cert_path(), "ca": config.ca_path()},
            )
            if config.metrics is not None
            else None
        )
        self.metrics_listeners: list[trio.SocketListener] = []
        self.proxy_listeners: list[trio.SocketListener] = []
        self.api = HttpApi(
            self.authority,
            self.keys,
            self.state,
            self.state_lane,
            config,
            lambda: self.policy.current,
            Admin(self.connections, self.broker),
            clock,
            Vitals(lambda: self.durability.commit_failure, lambda: len(self.connections), clock()),
        )
        self.identities = IdentitySlots(config.max_connections_per_identity)
        self._refusals = LogRate(REFUSAL_LINES, REFUSAL_WINDOW)
        self._stop = trio.Event()
        self._shared = Shared(
            self.broker,
            self.presence,
            lambda: self.policy.current,
            self.authority,
            self._is_revoked,
            clock,
            SessionLimits(
                config.max_subscriptions,
                config.heartbeat,
                config.max_subscriptions_per_identity,
                config.publish_rate,
                config.publish_burst,
            ),
        )
        self._frame_limits = Limits(config.max_frame_bytes, config.max_headers)

    def shutdown(self) -> None:
        """Begin a graceful shutdown (SIGINT/SIGTERM): close everyone with 1001."""
        self._stop.set()

    def reload_tls(self) -> None:
        """Re-read the certificate, key, CA bundle and CRL now (SIGHUP), changed or not."""
        self._reload_tls.set()

    async def listen(self) -> list[trio.SocketListener]:
        """Bind the port (and the metrics and proxy ports); separate from `run` so a bind
        error surfaces before any task starts."""
        listeners = await _bound(self.config.host, self.config.port, "")
        try:
            await self._bind_plain()
        except OSError:
            for listener in listeners:
                await listener.aclose()
            raise
        return listeners

    async def _bind_plain(self) -> None:
        """Bind the `--metrics` and `--proxy-listen` ports, once each."""
        if self.config.metrics is not None and not self.metrics_listeners:
            self.metrics_listeners = await _bound(*self.config.metrics, " (--metrics)")
        if self.config.proxy_listen is not None and not self.proxy_listeners:
            host, port = self.config.proxy_listen
            self.proxy_listeners = await _bound(host, port, " (--proxy-listen)")

    async def run(
        self,
        listeners: list[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve TLS on `listeners` (default: bind the configured port) until `shutdown()`."""

        async def accept(handlers: trio.Nursery) -> None:
            bound = listeners or await self.listen()
            port = bound[0].socket.getsockname()[1]
            log.info(
                "listening on https://%s:%d (STOMP at wss://%s:%d/ws)",
                self.config.host,
                port,
                self.config.host,
                port,
                extra={"event": "listening", "host": self.config.host, "port": port},
            )
            self.file_limit.report(self.config.max_connections)
            self._log_proxy_listening()
            task_status.started(port)
            async with trio.open_nursery() as acceptors:
                for listener in bound:
                    acceptors.start_soon(self._accept, listener, handlers, self._serve_tls)
                for listener in self.proxy_listeners:
                    acceptors.start_soon(self._accept, listener, handlers, self._serve_proxied)

        await self._bind_plain()  # before serve() starts the task that serves metrics
        await self.serve(accept)

    def _log_proxy_listening(self) -> None:
        for listener in self.proxy_listeners:
            host, port, *_ = listener.socket.getsockname()
            log.info(
                "listening for a TLS-terminating proxy on http://%s:%d",
                host,
                port,
                extra={"event": "proxy_listening", "host": host, "port": port},
            )

    async def serve(self, accept: Callable[[trio.Nursery], Awaitable[None]]) -> None:
        """Run the shared tasks (group commit, revocation and key polls, pruning) and `accept`,
        which starts each connection's handler in the nursery it is given, until `shutdown()`;
        then drain the connections and close storage."""
        try:
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as background:
                    background.start_soon(self._watch_revocations)
                    background.start_soon(self._watch_keys)
                    background.start_soon(self._watch_policy)
                    background.start_soon(self._watch_tls)
                    background.start_soon(self.durability.run)
                    background.start_soon(self.durability.run_later)
                    background.start_soon(self._prune)
                    background.start_soon(self._summarize)
                    if self.metrics is not None:
                        background.start_soon(self._serve_metrics, self.metrics)
                    background.start_soon(accept, handlers)
                    await self._stop.wait()
                    background.cancel_scope.cancel()
                await self._drain(handlers)
        finally:
            # Writes whatever is still pending, marks a clean shutdown.
            await self.history_lane.run_shielded(self.history.close)
            await self.state_lane.run_shielded(self.state.close)

    async def _serve_metrics(self, metrics: Metrics) -> None:
        await self._bind_plain()  # `serve` called without `run` (below TLS)
        await serve_metrics(metrics, self.metrics_listeners)

    async def _drain(self, handlers: trio.Nursery) -> None:
        for connection in list(self.connections):
            connection.end(Ending(CloseCode.GOING_AWAY, "server shutting down"))
        with trio.move_on_after(self.config.shutdown_grace):
            while self.connections:
                await trio.sleep(0.01)
        handlers.cancel_scope.cancel()

    async def _watch_revocations(self) -> None:
        """`chat-server revoke` runs in another process: poll the counter, then re-check
        every live session once the snapshot moved (PROTOCOL.md §7: within 2 s)."""
        checked = self.state.revocations.version
        outage = _Outage("re-reading revocations")
        while True:
            await trio.sleep(self.config.revocation_poll)
            try:
                current = (await self.state_lane.run(self.state.load_revocations)).version
            except StorageUnavailable as exc:
                outage.failed(exc)
                continue
            outage.over()
            if current == checked:
                continue
            checked = current
            log.info(
                "revocations changed; re-checking %d connections",
                len(self.connections),
                extra={"event": "revocations_changed", "connections": len(self.connections)},
            )
            for connection in list(self.connections):
                connection.check_authorization()

    async def _watch_keys(self) -> None:
        """`chat-server keys rotate` runs in another process: re-read the keys it changed."""
        outage = _Outage("re-reading signing keys")
        while True:
            await trio.sleep(self.config.revocation_poll)
            try:
                await self.keys_lane.run(self.keys.refresh)
            except StorageUnavailable as exc:
                outage.failed(exc)
                continue
            outage.over()

    async def _watch_policy(self) -> None:
        """The operator edits the policy file: re-read it, then re-check every live session
        (PROTOCOL.md §9: within 2 s). A broken file is logged; the old policy stays."""
        outage = _Outage("watching the policy file")
        while True:
            await trio.sleep(self.config.revocation_poll)
            try:
                if not await self.policy_lane.run(self.policy.changed):
                    continue
                await self.policy_lane.run(self.policy.reload)
            except StorageUnavailable as exc:
                outage.failed(exc)
                continue
            except PolicyError as exc:
                log.error(
                    "policy not reloaded, the previous one stays in force: %s",
                    exc,
                    extra={"event": "policy_not_reloaded", "error": str(exc)},
                )
                continue
            outage.over()
            log.info(
                "policy reloaded from %s",
                self.policy.path,
                extra={"event": "policy_reloaded", "path": str(self.policy.path)},
            )
            for connection in list(self.connections):
                connection.check_authorization()

    async def _watch_tls(self) -> None:
        """The operator replaces the server's certificate, key, CA bundle or CRL, or sends
        SIGHUP: build the new context in a lane, then end the live connections whose
        certificate the new CRL revokes (PROTOCOL.md §12: within 2 s). Files that make no
        context are logged once; the previous context stays in force."""
        while True:
            with trio.move_on_after(self.config.revocation_poll):
                await self._reload_tls.wait()
            asked, self._reload_tls = self._reload_tls.is_set(), trio.Event()
            if not asked:
                if not await self.tls_lane.run(self.tls.changed):
                    continue
                await trio.sleep(TLS_SETTLE)
            try:
                revoked = await self.tls_lane.run(self.tls.reload)
            except (pki.PkiError, StorageUnavailable) as exc:
                log.error(
                    "TLS files not reloaded, the previous ones stay in force: %s",
                    exc,
                    extra={"event": "tls_not_reloaded", "error": str(exc)},
                )
                continue
            trigger = "SIGHUP" if asked else "files changed"
            log.info(
                "TLS files reloaded (%s); the CRL revokes %d certificates",
                trigger,
                len(revoked),
                extra={"event": "tls_reloaded", "trigger": trigger, "revoked": len(revoked)},
            )
            for connection in list(self.connections):
                connection.check_certificate(revoked)

    async def _prune(self) -> None:
        while True:
            now = self.clock()
            lifetime = self.config.token_lifetime + self.config.clock_leeway
            try:
                await self.keys_lane.run(self.keys.prune, now, lifetime)
                await self.state_lane.run(self.state.prune, now)
            except StorageUnavailable as exc:
                log.warning(
                    "expired keys and tokens not pruned (%s); next time",
                    exc.detail,
                    extra={"event": "prune_failed", "error": exc.detail},
                )
            await trio.sleep(PRUNE_INTERVAL)

    async def _summarize(self) -> None:
        """Once per window: the refused handshakes the log rate held back, and what the
        connection bounds shed or refused (an attack, or limits set too low)."""
        shed, refused = self.admission.shed_total, self.admission.refused_total
        while True:
            await trio.sleep(REFUSAL_WINDOW)
            held = self._refusals.held_back()
            if held:
                log.info(
                    "%d more refused handshakes in the last %g s",
                    held,
                    REFUSAL_WINDOW,
                    extra={"event": "handshakes_refused", "count": held, "window": REFUSAL_WINDOW},
                )
            if self.admission.shed_total != shed or self.admission.refused_total != refused:
                log.warning(
                    "in the last %g s: %d unfinished connections shed, %d new ones refused "
                    "(connections %d of %d, handshakes in progress %d of %d)",
                    REFUSAL_WINDOW,
                    self.admission.shed_total - shed,
                    self.admission.refused_total - refused,
                    self.admission.connections,
                    self.admission.max_connections,
                    self.admission.handshakes,
                    self.admission.max_handshakes,
                    extra={
                        "event": "connections_shed",
                        "window": REFUSAL_WINDOW,
                        "shed": self.admission.shed_total - shed,
                        "refused": self.admission.refused_total - refused,
                        "connections": self.admission.connections,
                        "handshakes": self.admission.handshakes,
                    },
                )
                shed, refused = self.admission.shed_total, self.admission.refused_total

    def _refused(self, address: str, reason: object) -> None:
        if self._refusals.allow(trio.current_time()):
            log.info(
                "refused %s: %s",
                address,
                reason,
                extra={"event": "handshake_refused", "peer": address, "reason": str(reason)},
            )

    def _is_revoked(self, claims: Claims) -> bool:
        """From the revocation snapshot: the event loop never reads the database."""
        return self.state.revocations.is_revoked(claims)

    async def _accept(
        self, listener: trio.SocketListener, handlers: trio.Nursery, serve: Serve
    ) -> None:
        """Accept in batches of ACCEPT_BATCH per wake-up rather than one per scheduler pass
        (trio's `serve_listeners`): after a wave of connections the kernel's accept queue
        (somaxconn long, then SYNs are dropped and retried a second later) empties about
        three times sooner, so healthy clients are not dropped behind a flood."""
        async with listener:
            with socket.socket(fileno=os.dup(listener.socket.fileno())) as sock:
                sock.setblocking(False)
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        for conn in _accept_batch(sock):
                            accepted = trio.socket.from_stdlib_socket(conn)
                            self._arrive_socket(accepted, handlers, serve)
                    except OSError as exc:  # out of files or memory: FILE_RESERVE was not enough
                        log.error(
                            "cannot accept connections: %s",
                            exc.strerror,
                            extra={"event": "accept_failed", "error": exc.strerror},
                        )
                        await trio.sleep(ACCEPT_PAUSE)

    def _arrive_socket(
        self, sock: trio.socket.SocketType, handlers: trio.Nursery, serve: Serve
    ) -> None:
        """Admit (or close) a socket as it is accepted, so that the files held never exceed
        the bound even while the handlers of a whole batch have yet to run."""
        ticket = Ticket(sock.close)
        if not self._arrive(ticket):
            log.debug(
                "connection refused: %d connections",
                self.admission.connections,
                extra={"event": "connection_refused", "connections": self.admission.connections},
            )
            sock.close()
            return
        raw = trio.SocketStream(sock)
        handlers.start_soon(self._admitted, raw, partial(serve, raw), ticket)

    def _arrive(self, ticket: Ticket) -> bool:
        arrival = self.admission.arrive(ticket)
        for shed in arrival.shed:
            shed.shed()
        return arrival.admitted

    async def serve_stream(
        self, stream: trio.abc.Stream, peer: Peer, head_deadline: float | None = None
    ) -> None:
        """What follows the TLS handshake, over any stream: read the request head (by
        `head_deadline`, default the handshake timeout from now), route, upgrade, run the
        connection. `peer` is who the handshake established. An internal error ends only
        this connection: it is logged, not raised."""

        async def serve(ticket: Ticket) -> None:
            self._start(ticket)  # the stream is open: its request head is under way
            await self._serve_stream(stream, _known(peer), head_deadline, ticket)

        ticket = Ticket()
        if self._arrive(ticket):
            await self._admitted(stream, serve, ticket)
        else:
            await trio.aclose_forcefully(stream)

    async def _admitted(
        self, stream: trio.abc.Stream, serve: Callable[[Ticket], Awaitable[None]], ticket: Ticket
    ) -> None:
        """Serve one admitted connection (cancelled if shed while it is unfinished), then
        leave. The one boundary where a bug in handling one connection stops at that
        connection."""
        with ticket.scope:
            try:
                await serve(ticket)
            except Exception:
                log.exception(
                    "internal error on a connection; it was closed",
                    extra={"event": "internal_error"},
                )
            finally:
                await trio.aclose_forcefully(stream)
                self.admission.left(ticket)

    def _start(self, ticket: Ticket) -> None:
        for shed in self.admission.started(ticket):
            shed.shed()

    async def _serve_tls(self, raw: trio.SocketStream, ticket: Ticket) -> None:
        stream: trio.SSLStream[trio.SocketStream] | None = None
        try:
            with trio.fail_after(IDLE_TIMEOUT * (1 - IDLE_SPREAD * random.random())):
                await trio.lowlevel.wait_readable(raw.socket)  # idle, it costs no TLS state
            deadline = trio.current_time() + self.config.handshake_timeout
            with trio.fail_at(deadline):
                self._start(ticket)
                stream = trio.SSLStream(
                    raw, self.tls.current(), server_side=True, https_compatible=True
                )
                await stream.do_handshake()
                peer = _peer_of(stream, _address(raw))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            if stream is not None:  # bytes came: a handshake began and failed
                self.stats.handshake(TLS_FAILED)
            reason = refusal_reason(exc)
            if reason is None:
                log.debug(
                    "handshake failed: %r",
                    exc,
                    extra={"event": "handshake_failed", "peer": _address(raw), "error": repr(exc)},
                )
            else:
                self._refused(_address(raw), reason)
            return
        except pki.PkiError as exc:  # no HTTP byte is read from a peer without an identity
            self.stats.handshake(TLS_FAILED)
            self._refused(_address(raw), exc)
            return
        await self._serve_stream(stream, _known(peer), deadline, ticket)

    async def _serve_proxied(self, raw: trio.SocketStream, ticket: Ticket) -> None:
        """A connection to `--proxy-listen`: plain HTTP from the proxy, the client's
        certificate in a header (proxy.py); the rest as on the TLS listener."""
        address = _address(raw)

        def identify(request: Request) -> Peer:
            try:
                return self.proxy.identify(address, request)
            except HttpRefusal as refusal:
                self._refused(address, f"{refusal.code}: {refusal.detail}")
                raise

        self._start(ticket)
        await self._serve_stream(raw, identify, None, ticket)

    async def _serve_stream(
        self,
        stream: trio.abc.Stream,
        identify: Identify,
        head_deadline: float | None,
        ticket: Ticket,
    ) -> None:
        if head_deadline is None:
            head_deadline = trio.current_time() + self.config.handshake_timeout
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD + 1)
        try:
            with trio.fail_at(head_deadline):
                request = await _read_request(stream, http)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            log.debug(
                "no request head: %r", exc, extra={"event": "no_request_head", "error": repr(exc)}
            )
            return
        except (h11.RemoteProtocolError, HttpRefusal) as exc:
            await _respond(stream, http, refusal_response(_as_refusal(exc)))
            return
        self.admission.opened(ticket)
        try:
            peer = identify(request)
        except HttpRefusal as refusal:
            self.stats.handshake(refusal.code)
            await _respond(stream, http, refusal_response(refusal))
            return
        if request.path == WS_PATH and is_upgrade(request):
            await self._upgrade(stream, http, request, peer)
        else:
            await _respond(stream, http, await self.api.handle(request, peer))

    async def _upgrade(
        self, stream: trio.abc.Stream, http: h11.Connection, request: Request, peer: Peer
    ) -> None:
        try:
            upgrade = authorize(request, peer, self.authority, self._is_revoked, self.clock())
            ws = WSConnection(ConnectionType.SERVER)
            ws.initiate_upgrade_connection(
                [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
                request.path,
            )
            list(ws.events())
            self.identities.take(peer.identity)  # last: nothing to give back if refused
        except WsProtocolError as exc:
            self.stats.handshake(BadHandshake.code)
            await _respond(stream, http, refusal_response(BadHandshake(str(exc))))
            return
        except HttpRefusal as refusal:
            self.stats.handshake(refusal.code)
            log.info(
                "refused upgrade from %s: %s",
                peer.identity,
                refusal.code,
                extra={
                    "event": "upgrade_refused",
                    "peer": peer.address or None,
                    "sub": peer.identity,
                    "status": refusal.status,
                    "code": refusal.code,
                    "detail": refusal.detail,
                },
            )
            await _respond(stream, http, refusal_response(refusal))
            return
        self.stats.handshake(OK)
        try:
            await self._run_connection(stream, ws, upgrade, peer, http.trailing_data[0])
        finally:
            self.identities.give_back(peer.identity)

    async def _run_connection(
        self, stream: trio.abc.Stream, ws: WSConnection, upgrade: Upgrade, peer: Peer, data: bytes
    ) -> None:
        latency = None if self.metrics is None else self.metrics.latency.observe
        outbox = Outbox(self.config.outbound_buffer_bytes, latency)
        session = StompSession(outbox, upgrade.claims, self._shared)
        connection = Connection(
            stream,
            ws,
            session,
            outbox,
            FrameParser(self._frame_limits),
            self.config.connect_timeout,
            self.config.close_timeout,
            address=peer.address,
            since=self.clock(),
            serial=peer.serial,
        )
        outbox.push(ws.send(AcceptConnection(subprotocol=upgrade.subprotocol)))
        log.info(
            "%s connected as %s (%s)",
            peer.identity,
            session.id,
            upgrade.subprotocol,
            extra={
                "event": "connected",
                "peer": peer.address or None,
                "sub": peer.identity,
                "conn": session.id,
                "subprotocol": upgrade.subprotocol,
            },
        )
        self.connections.add(connection)
        try:
            await connection.run(data)
        finally:
            self.connections.discard(connection)
            if outbox.overflowed.is_set():
                self.stats.evictions += 1


async def serve(
    config: ServerConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a server until cancelled; `task_status.started(port)` once it listens."""
    await ChatServer(config).run(task_status=task_status)


async def _bound(host: str, port: int, what: str) -> list[trio.SocketListener]:
    """Listeners on host:port; an OSError whose text names the address (and `what`)."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"{host}:{port}{what}: {exc.strerror or exc}") from exc


def _open_history(config: ServerConfig) -> History:
    retention = Retention(
        config.retention_count,
        config.retention_age,
        config.retention_bytes,
        config.history_memory_bytes,
        config.max_topics,
    )
    if config.history == "memory":
        return History.memory(retention)
    return History.open_sqlite(config.state_dir / "history.db", retention)


def _known(peer: Peer) -> Identify:
    """The identity a TLS handshake established: no request header can change it."""
    return lambda _request: peer


def _peer_of(stream: TlsStream, address: str) -> Peer:
    der = stream.getpeercert(binary_form=True)
    if der is None:  # CERT_REQUIRED makes this unreachable; refuse rather than assume
        raise trio.BrokenResourceError("no client certificate")
    return Peer(pki.client_identity(der), pki.thumbprint(der), address, pki.serial_of(der))


def _address(raw: trio.SocketStream) -> str:
    try:
        host, port, *_ = raw.socket.getpeername()
    except OSError:
        return "a peer"
    return f"{host}:{port}"


def _accept_batch(sock: socket.socket) -> Iterator[socket.socket]:
    """Up to ACCEPT_BATCH connections waiting on a non-blocking listening socket; raises
    OSError only for a lack of resources (a connection reset before it was accepted is
    skipped, as trio's `SocketListener.accept` does)."""
    for _ in range(ACCEPT_BATCH):
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                raise
            continue
        yield conn


async def _read_request(stream: trio.abc.Stream, http: h11.Connection) -> Request:
    """One request, its head read to exactly MAX_REQUEST_HEAD bytes: before the head is
    complete no receive asks for more than the limit plus one byte (h11 checks its own bound
    only between receives, so one large receive could carry twice the limit)."""
    head: h11.Request | None = None
    body = bytearray()
    received = 0
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            if head is None and received > MAX_REQUEST_HEAD:
                raise RequestHeadTooLarge(HEAD_LIMIT)
            want = MAX_REQUEST_HEAD + 1 - received if head is None else MAX_REQUEST_BODY
            data = bytes(await stream.receive_some(want))
            received += len(data)
            http.receive_data(data)
        elif isinstance(event, h11.Request):
            if received - len(http.trailing_data[0]) > MAX_REQUEST_HEAD:  # the head's own bytes
                raise RequestHeadTooLarge(HEAD_LIMIT)
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY:
                raise BodyTooLarge(f"request bodies are limited to {MAX_REQUEST_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return _request_of(head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("client closed before sending a request")


class _Outage:
    """A polling task's storage failures, logged once per outage rather than once per poll."""

    def __init__(self, task: str) -> None:
        self._task = task
        self._failing = False

    def failed(self, exc: StorageUnavailable) -> None:
        if not self._failing:
            log.warning(
                "%s fails (%s); retrying",
                self._task,
                exc.detail,
                extra={"event": "storage_failing", "task": self._task, "error": exc.detail},
            )
        self._failing = True

    def over(self) -> None:
        if self._failing:
            log.warning(
                "%s works again",
                self._task,
                extra={"event": "storage_recovered", "task": self._task},
            )
        self._failing = False


def _request_of(head: h11.Request, body: bytes) -> Request:
    path = head.target.decode("ascii", "replace").split("?", 1)[0]
    headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
    return Request(head.method.decode("ascii", "replace"), path, headers, body)


def _as_refusal(exc: Exception) -> HttpRefusal:
    if isinstance(exc, HttpRefusal):
        return exc
    return BadRequest(f"malformed HTTP request: {exc}")


async def _respond(stream: trio.abc.Stream, http: h11.Connection, response: Response) -> None:
    headers = [
        *response.headers,
        ("Content-Length", str(len(response.body))),
        ("Connection", "close"),
    ]
    try:
        data = http.send(h11.Response(status_code=response.status, headers=headers))
        data += http.send(h11.Data(data=response.body)) + http.send(h11.EndOfMessage())
        with trio.move_on_after(5):
            await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await trio.aclose_forcefully(stream)
