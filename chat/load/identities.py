"""The client identities a load run connects as: certificate files, TLS contexts, tokens.

Connections reuse identities round-robin, so a few certificates can drive many
connections; each identity fetches one access token, and renews it once for all of its
connections when it nears expiry (`SharedGrant`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

from chat.client.http import TokenGrant, fetch_token, refresh_token
from chat.pki import RESERVED_NAMES, client_ssl_context

RENEW_AFTER = 0.5  # a grant older than this share of its lifetime is renewed for everyone


class NoIdentities(Exception):
    """The certificates directory holds no usable client certificate."""


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    name: str
    cert: Path
    key: Path


def find_identities(directory: Path) -> list[IdentityFiles]:
    """Every NAME.crt with a NAME.key beside it, except the CA's and the server's, by name."""
    if not directory.is_dir():
        raise NoIdentities(f"certificates directory {directory} does not exist")
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


class SharedGrant:
    """One identity's access token, shared by all its connections and renewed once for all."""

    def __init__(self, base_url: str, context: ssl.SSLContext, grant: TokenGrant) -> None:
        self._base_url = base_url
        self._context = context
        self._grant = grant
        self._fetched_at = trio.current_time()
        self._lock = trio.Lock()

    @property
    def token(self) -> str:
        return self._grant.access_token

    @property
    def expires_in(self) -> float:
        return self._grant.expires_in - (trio.current_time() - self._fetched_at)

    async def renew(self) -> TokenGrant:
        """A grant fresh enough to hand to `StompClient.keep_authorized`."""
        async with self._lock:  # the first caller fetches; the others reuse its grant
            age = trio.current_time() - self._fetched_at
            if age > RENEW_AFTER * self._grant.expires_in:
                self._grant = await self._fetch()
                self._fetched_at = trio.current_time()
        return TokenGrant(self._grant.access_token, int(self.expires_in), None)

    async def _fetch(self) -> TokenGrant:
        refresh = self._grant.refresh_token
        if refresh is None:
            return await fetch_token(self._base_url, self._context)
        return await refresh_token(self._base_url, self._context, refresh)


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    context: ssl.SSLContext
    grant: SharedGrant | None  # None in raw mode: the baseline server takes no token


def contexts(files: list[IdentityFiles], ca: Path) -> list[tuple[str, ssl.SSLContext]]:
    """A client TLS context per identity (raises PkiError naming a bad file)."""
    return [(f.name, client_ssl_context(f.cert, f.key, ca)) for f in files]


async def with_tokens(
    base_url: str, named: list[tuple[str, ssl.SSLContext]]
) -> list[Identity]:
    """Fetch one token per identity; the first ClientError (unreachable, refused) propagates.

    One after another: a token costs a few ms, and a refusal then surfaces as itself
    rather than inside an exception group.
    """
    identities = []
    for name, context in named:
        grant = await fetch_token(base_url, context)
        identities.append(Identity(name, context, SharedGrant(base_url, context, grant)))
    return identities
