"""The client identities a load run connects as: certificate files, TLS contexts, tokens.

Connections reuse identities round-robin, so a few certificates can drive many
connections. Without `--identities`, every NAME.crt/NAME.key pair in the directory that
would work is taken and the others are skipped with a reason (an encrypted key, a
certificate expired, not yet valid, or from another CA): a stale file in a shared
directory should not stop a run. Named identities must all work. Each identity has one
`SharedTokens`: its connections (and their reconnects) share one access token, renewed
once for all of them, instead of one token request per connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from chat.client.auth import MemoryTokens, Notice, TokenSource
from chat.client.connection import MIN_RENEW_DELAY, TOKEN_CLOCK_GRAIN
from chat.client.http import TokenGrant
from chat.pki import (
    CA_CERT,
    RESERVED_NAMES,
    KeyPassphraseRequired,
    PkiError,
    client_ssl_context,
    rejection_cause,
)

SHARE_WHILE = 0.5  # a token with more than this share of its life left is handed out as is
# ...and at least this long: a connection renews no sooner than MIN_RENEW_DELAY after taking
# a token, so one that ends sooner than twice that could expire before its renewal.
MIN_SHARED_LIFE = 2 * MIN_RENEW_DELAY


class NoIdentities(Exception):
    """No usable client certificate, or one asked for by name is missing or unusable."""


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Skipped:
    """A certificate left out of the run, and why (one warning line)."""

    name: str
    reason: str  # names the file


def find_identities(directory: Path, names: Sequence[str] = ()) -> list[IdentityFiles]:
    """The pairs named (all of them must exist), or every NAME.crt with a NAME.key beside
    it except the CA's and the server's, by name."""
    if not directory.is_dir():
        raise NoIdentities(f"certificates directory {directory} does not exist")
    if names:
        return _named(directory, names)
    found = [
        IdentityFiles(crt.stem, crt, crt.with_suffix(".key"))
        for crt in sorted(directory.glob("*.crt"))
        if crt.stem not in RESERVED_NAMES and crt.with_suffix(".key").is_file()
    ]
    if not found:
        raise NoIdentities(
            f"no client certificates (NAME.crt with NAME.key) in {directory}; "
            f"make some with: chat-certs client NAME --dir {directory}"
        )
    return found


def _named(directory: Path, names: Sequence[str]) -> list[IdentityFiles]:
    files = [IdentityFiles(n, directory / f"{n}.crt", directory / f"{n}.key") for n in names]
    unknown = [
        f.name
        for f in files
        if f.name in RESERVED_NAMES or not (f.cert.is_file() and f.key.is_file())
    ]
    if unknown:
        raise NoIdentities(
            f"--identities: no {', '.join(unknown)} in {directory} (each NAME needs "
            f"NAME.crt and NAME.key; make one with: chat-certs client NAME --dir {directory})"
        )
    return files


def load_contexts(
    files: list[IdentityFiles], ca: Path, issuer: Path
) -> tuple[list[tuple[str, ssl.SSLContext]], list[Skipped]]:
    """A client TLS context per usable identity (`ca`: what the server must chain to), and
    the identities that would not work: an encrypted key, a certificate not current, or
    not issued by `issuer` (the CA of the certificates directory)."""
    usable, skipped = [], []
    for f in files:
        try:
            usable.append((f.name, _context(f, ca, issuer)))
        except PkiError as exc:
            skipped.append(Skipped(f.name, str(exc)))
    return usable, skipped


def _context(files: IdentityFiles, ca: Path, issuer: Path) -> ssl.SSLContext:
    try:
        context = client_ssl_context(files.cert, files.key, ca)
    except KeyPassphraseRequired as exc:  # its hint names an option chat-load does not have
        raise PkiError(
            f"{exc.path} is an encrypted private key; chat-load needs unencrypted keys"
        ) from None
    cause = rejection_cause(files.cert, issuer) if issuer.is_file() else None
    if cause is not None:
        raise PkiError(cause)
    return context


def issuer_of(directory: Path, ca: Path) -> Path:
    """The CA that issued the directory's certificates: its ca.crt, else the trusted CA."""
    own = directory / CA_CERT
    return own if own.is_file() else ca


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class Lease:
    """An access token and until when it is sure to be valid (trio clock).

    The server counts `exp` in whole seconds of its own clock, so a token may end up to
    TOKEN_CLOCK_GRAIN before `expires_in` says; and it was issued after we asked, so its
    life is counted from the request, not from the answer.
    """

    token: str
    valid_until: float
    life: float  # valid_until - the moment it was asked for

    @classmethod
    def of(cls, grant: TokenGrant, asked_at: float) -> Lease:
        life = max(0.0, grant.expires_in - TOKEN_CLOCK_GRAIN)
        return cls(grant.access_token, asked_at + life, life)

    def worn(self, now: float) -> bool:
        """Too old to hand out: a connection taking it might not renew it in time."""
        left = self.valid_until - now
        return left < SHARE_WHILE * self.life or left < MIN_SHARED_LIFE

    def grant(self, now: float) -> TokenGrant:
        """The token as a grant whose `expires_in` claims no more than is sure (the client
        takes TOKEN_CLOCK_GRAIN off again, so it renews early: never late)."""
        left = max(0.0, self.valid_until - now)
        return TokenGrant(self.token, int(left + TOKEN_CLOCK_GRAIN), None)


class SharedTokens(TokenSource):
    """One identity's tokens for all its connections: a fresh one only when the current one
    is worn, so 100 connections over 4 certificates make 4 token requests, not 100."""

    def __init__(self, base_url: str, context: ssl.SSLContext, on_notice: Notice) -> None:
        super().__init__(base_url, context, MemoryTokens(), on_notice)
        self._lease: Lease | None = None
        self._sharing = trio.Lock()  # the first caller fetches; the others wait and reuse

    async def grant(self) -> TokenGrant:
        async with self._sharing:
            lease = self._lease
            if lease is None or lease.worn(trio.current_time()):
                asked_at = trio.current_time()
                lease = self._lease = Lease.of(await super().grant(), asked_at)
        return lease.grant(trio.current_time())


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    context: ssl.SSLContext
    tokens: SharedTokens | None  # None in raw mode: the baseline server takes no token


async def with_tokens(
    base_url: str, named: list[tuple[str, ssl.SSLContext]], on_notice: Notice
) -> list[Identity]:
    """Fetch one token per identity; the first ClientError (unreachable, refused) propagates.

    One after another: a token costs a few ms, and a refusal then surfaces as itself
    rather than inside an exception group.
    """
    identities = []
    for name, context in named:
        tokens = SharedTokens(base_url, context, on_notice)
        await tokens.grant()
        identities.append(Identity(name, context, tokens))
    return identities
