"""Tokens for one client certificate (PROTOCOL.md §1, §7) and the connection they open.

How this works: `TokenSource.grant()` is the client's one way to an access token. When a
refresh token is stored it spends it (`POST /auth/refresh`), else, or when the server
refuses it, it asks with the certificate alone (`POST /auth/token`); the new refresh token
is stored either way. A `TokenFile` keeps it on disk, owner-only from its first byte, and
is locked around each read-spend-write, so two processes sharing a certificate never spend
one refresh token twice (the server would take that for theft and revoke the family).
`connect_authorized()` opens a STOMP connection with a grant, retries once with a fresh
one when the handshake says `token_expired`, and renews the token in-band while connected.
The token endpoints and /ws share one listener, so both are reached through the source's
`dial` (TCP + TLS; a test's memory stream below TLS). Tokens are never printed: not in
messages, not in a repr.
"""

from __future__ import annotations

import fcntl
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Protocol

import trio

from chat.client.backoff import DEFAULT_BACKOFF, Backoff
from chat.client.connection import HANDSHAKE_TIMEOUT, StompClient, stomp_over
from chat.client.errors import ClientError, ServerUnreachable, TokenRefused
from chat.client.http import HTTP_TIMEOUT, Dial, TokenGrant, fetch_token, refresh_token
from chat.client.tls import HTTP_SCHEMES, WS_SCHEMES, open_tls_stream, parse_url
from chat.client.websocket import websocket_over
from chat.pki import client_ssl_context
from chat.protocol.wire import STOMP_SUBPROTOCOL, WS_PATH, bearer_subprotocol
from chat.store.files import write_atomic

__all__ = [
    "ExposedTokenFile",
    "MemoryTokens",
    "TokenFile",
    "TokenFileError",
    "TokenSource",
    "TokenStore",
    "connect_authorized",
    "default_token_file",
    "open_chat",
    "server_urls",
]

log = logging.getLogger("chat.client")

TOKEN_FILE_MODE = 0o600  # a refresh token is a credential: owner only, from the first byte
REFRESH_SUFFIX = ".refresh"  # certs/alice.crt -> certs/alice.refresh
MAX_TOKEN_BYTES = 4096  # a refresh token is ~50 characters: read no more of a strange file
LOCK_SUFFIX = ".lock"  # the token file is replaced on each write: lock a file that stays
LOCK_POLL = 0.02  # seconds between tries for a lock another process holds
LOCK_TIMEOUT = 3 * HTTP_TIMEOUT  # its holder makes at most a refresh and a token request
EXPIRED = "token_expired"  # PROTOCOL.md §2: the one handshake refusal a fresh token cures

# Refusals of a stored refresh token worth telling the user about (PROTOCOL.md §7); any
# other (refresh_expired, invalid_refresh, ...) falls back to the certificate quietly.
_LOUD_REFUSALS = {
    "refresh_reused": "the server revoked the token family because a refresh token was used "
    "twice (someone may have copied {store}); getting a new token with the certificate",
    "token_cert_mismatch": "{store} holds a refresh token issued to another certificate; "
    "getting a new token with this one",
}

Notice = Callable[[str], None]


class TokenFileError(ClientError):
    """The refresh token file cannot be used (unreadable directory, no permission, locked)."""


class ExposedTokenFile(TokenFileError):
    """The refresh token file is readable by other users: its token may be known to them."""


class TokenStore(Protocol):
    """Where the current refresh token waits between uses."""

    @property
    def label(self) -> str:
        """How messages name it (never its content)."""
        ...

    def load(self) -> str | None: ...

    def save(self, token: str) -> None: ...

    def locked(self) -> AbstractAsyncContextManager[None]: ...


class MemoryTokens:
    """A refresh token kept only by this process: the library's default."""

    label = "the stored refresh token"

    def __init__(self) -> None:
        self._token: str | None = None

    def __repr__(self) -> str:
        return "MemoryTokens()"

    def load(self) -> str | None:
        return self._token

    def save(self, token: str) -> None:
        self._token = token

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        yield  # one process: TokenSource's own lock is enough


class TokenFile:
    """A refresh token in a file, mode 0600, replaced atomically and locked across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    @property
    def label(self) -> str:
        return str(self.path)

    def load(self) -> str | None:
        """The stored token, or None; `ExposedTokenFile` when others may read the file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error("read", exc) from exc
        with os.fdopen(fd, "rb") as file:
            if os.fstat(file.fileno()).st_mode & 0o077:
                raise ExposedTokenFile(
                    f"{self.path} is readable by other users: not using its refresh token; "
                    "getting a new token with the certificate"
                )
            token = file.read(MAX_TOKEN_BYTES).decode("ascii", "replace").strip()
        return token or None

    def save(self, token: str) -> None:
        """Replace the file atomically, 0600 from its first byte: never a partial token."""
        try:
            write_atomic(self.path, f"{token}\n".encode("ascii"), mode=TOKEN_FILE_MODE)
        except OSError as exc:
            raise self._error("write", exc) from exc

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold an exclusive lock (flock) on `<file>.lock`, polled so trio stays responsive."""
        lock = self.path.with_name(self.path.name + LOCK_SUFFIX)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, TOKEN_FILE_MODE)
        except OSError as exc:
            raise self._error("lock", exc) from exc
        try:
            with trio.move_on_after(LOCK_TIMEOUT) as waited:
                while not _try_lock(fd):
                    await trio.sleep(LOCK_POLL)
            if waited.cancelled_caught:
                raise TokenFileError(
                    f"{lock} has been locked by another process for {LOCK_TIMEOUT:g} s"
                )
            yield
        finally:
            os.close(fd)  # releases the lock

    def _error(self, action: str, exc: OSError) -> TokenFileError:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return TokenFileError(f"cannot {action} the refresh token file {self.path}: {reason}")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def default_token_file(cert: Path) -> Path:
    """Where a certificate's refresh token lives unless told otherwise: beside it."""
    return cert.with_suffix(REFRESH_SUFFIX)


class TokenSource:
    """Fresh grants for one certificate: refresh when a refresh token is stored, else ask anew.

    `on_notice` hears, in one line, what the user should know (a refresh token used twice,
    a token file from another certificate, a file that cannot be used: then the token is
    kept in memory only); routine fallbacks only go to the debug log. `dial` reaches the
    server, for these requests and for `connect_authorized()`'s link.
    """

    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext,
        store: TokenStore | None = None,
        on_notice: Notice = log.warning,
        *,
        dial: Dial = open_tls_stream,
    ) -> None:
        self.base_url = base_url
        self.dial = dial
        self._ssl_context = ssl_context
        self._store: TokenStore = store if store is not None else MemoryTokens()
        self._on_notice = on_notice
        self._lock = trio.Lock()  # one spend at a time within this process

    async def grant(self) -> TokenGrant:
        """A new access token; the refresh token it came with replaces the stored one.

        Raises `TokenRefused` when the certificate itself is refused (e.g. 403
        `identity_revoked`), and transport errors.
        """
        async with self._lock:
            try:
                async with self._store.locked():
                    return await self._rotate()
            except TokenFileError as exc:  # cannot lock or read it (before any spend)
                self._forget_file(exc)
            return await self._rotate()

    async def _rotate(self) -> TokenGrant:
        grant = await self._refreshed()
        if grant is None:
            grant = await fetch_token(self.base_url, self._ssl_context, dial=self.dial)
        if grant.refresh_token is not None:
            try:
                self._store.save(grant.refresh_token)
            except TokenFileError as exc:
                self._forget_file(exc)
                self._store.save(grant.refresh_token)
        return grant

    def _forget_file(self, exc: TokenFileError) -> None:
        """Carry on with the refresh token in memory: a chat beats a cached token."""
        self._on_notice(f"{exc}; keeping the refresh token in memory only")
        self._store = MemoryTokens()

    async def _refreshed(self) -> TokenGrant | None:
        """A grant for the stored refresh token, or None when there is none or it is refused."""
        try:
            stored = self._store.load()
        except ExposedTokenFile as exposed:  # the new token is saved owner-only over it
            self._on_notice(str(exposed))
            return None
        if stored is None:
            return None
        try:
            return await refresh_token(self.base_url, self._ssl_context, stored, dial=self.dial)
        except TokenRefused as refused:
            loud = _LOUD_REFUSALS.get(refused.code)
            if loud is not None:
                self._on_notice(loud.format(store=self._store.label))
            else:
                log.debug("stored refresh token refused (%s); using the certificate", refused.code)
            return None


# ---------------------------------------------------------------- connecting with tokens


def server_urls(url: str) -> tuple[str, str]:
    """(https base URL, wss URL) from either: the token endpoints and /ws share one listener."""
    if url.startswith("https://"):
        parsed = parse_url(url, HTTP_SCHEMES)
        return f"https://{parsed.endpoint}", f"wss://{parsed.endpoint}{WS_PATH}"
    parsed = parse_url(url, WS_SCHEMES)
    return f"https://{parsed.endpoint}", url


@asynccontextmanager
async def connect_authorized(
    ws_url: str,
    ssl_context: ssl.SSLContext,
    tokens: TokenSource,
    *,
    heartbeat: tuple[int, int] = (10000, 10000),
    grant: TokenGrant | None = None,
) -> AsyncIterator[StompClient]:
    """A connected client kept authorized: `grant` (default: a fresh one) opens it, a
    handshake refused with `token_expired` is retried once with a fresh grant, and the
    token is renewed in-band (refreshing, storing the rotated refresh token) before expiry.
    """
    grant = grant or await tokens.grant()
    async with AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                _connect(ws_url, ssl_context, grant.access_token, heartbeat, tokens.dial)
            )
        except TokenRefused as refused:
            if refused.code != EXPIRED:
                raise
            grant = await tokens.grant()
            client = await stack.enter_async_context(
                _connect(ws_url, ssl_context, grant.access_token, heartbeat, tokens.dial)
            )
        client.keep_authorized(tokens.grant, grant.expires_in)
        yield client


@asynccontextmanager
async def _connect(
    ws_url: str, ssl_context: ssl.SSLContext, token: str, heartbeat: tuple[int, int], dial: Dial
) -> AsyncIterator[StompClient]:
    """`connection.connect()` over the stream `dial` opens (that one always dials TLS)."""
    url = parse_url(ws_url, WS_SCHEMES)
    offered = [STOMP_SUBPROTOCOL, bearer_subprotocol(token)]
    stream = await dial(url.endpoint, ssl_context, HANDSHAKE_TIMEOUT)
    async with (
        websocket_over(stream, url, offered, HANDSHAKE_TIMEOUT) as link,
        stomp_over(link, url.endpoint.host, heartbeat) as client,
    ):
        yield client


def token_store(token_file: Path | None) -> TokenStore:
    """The file store at `token_file`, or memory only when None."""
    return MemoryTokens() if token_file is None else TokenFile(token_file)


@asynccontextmanager
async def open_chat(
    url: str,
    cert: Path,
    key: Path,
    ca: Path,
    *,
    passphrase: bytes | None = None,
    heartbeat: tuple[int, int] = (10000, 10000),
    token_file: Path | None = None,
    on_notice: Notice = log.warning,
    attempts: int = 1,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> AsyncIterator[StompClient]:
    """Certificate files to one connected, authorized client (no reconnect: see resilient.py).

    `url` is the wss:// STOMP URL or the https:// base URL; `token_file` keeps the refresh
    token across runs (None: memory only). An unreachable server is tried `attempts` times,
    `backoff` apart. Raises `PkiError` for unusable certificate files, `ClientError` else.
    """
    base_url, ws_url = server_urls(url)
    ssl_context = client_ssl_context(cert, key, ca, passphrase)
    tokens = TokenSource(base_url, ssl_context, token_store(token_file), on_notice)
    async with AsyncExitStack() as stack:
        for attempt in range(attempts):
            try:
                client = await stack.enter_async_context(
                    connect_authorized(ws_url, ssl_context, tokens, heartbeat=heartbeat)
                )
                break
            except ServerUnreachable as exc:
                if attempt + 1 >= attempts:
                    raise gave_up(exc, attempts) from exc
                await trio.sleep(backoff.delay(attempt))
        yield client


def gave_up(exc: ServerUnreachable, attempts: int) -> ServerUnreachable:
    """`exc`, saying how many tries it took to give up."""
    tries = "" if attempts == 1 else f" (tried {attempts} times)"
    return ServerUnreachable(f"{exc}{tries}")
