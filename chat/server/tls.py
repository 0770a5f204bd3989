"""The server's TLS files (PROTOCOL.md §12): certificate, key, CA bundle and CRL, re-read
when they change, without a restart.

How this works: `TlsContexts` holds the SSL context new handshakes use and the client serials
its CRL revokes. The server's watcher calls `changed()` and `reload()` on a lane, never on the
event loop (both read files); a change is noticed by the files' stamps (device, inode, size,
modification time), so an atomic rename counts too. A reload that fails keeps the previous
context in force and remembers the stamps, so each broken version is reported once.
"""

from __future__ import annotations

import ssl
from datetime import datetime
from pathlib import Path

from cryptography import x509

from chat import pki
from chat.server.config import ServerConfig
from chat.store.files import Stamp, stamp


class TlsContexts:
    """The SSL context for new handshakes and the serials its CRL revokes."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._paths = (config.cert_path(), config.key_path(), config.ca_path(), config.crl_path())
        self._stamps = _stamps(self._paths)
        self._tls = self._load()

    def current(self) -> ssl.SSLContext:
        """The context for a new handshake."""
        return self._tls.context

    def verify_client(self, cert: x509.Certificate, now: datetime) -> None:
        """Check a client certificate that came without a handshake (from a proxy) against
        the CA bundle and CRL in force, so a reload applies to it too; PkiError if refused."""
        pki.verify_client(cert, self._tls, now)

    def changed(self) -> bool:
        """Whether a file differs from the version last loaded (or tried). Blocking."""
        return _stamps(self._paths) != self._stamps

    def reload(self) -> frozenset[int]:
        """Load the files as they are now; the serials the new CRL revokes. On a PkiError
        the previous context stays in force. Blocking."""
        self._stamps = _stamps(self._paths)
        self._tls = self._load()
        return self._tls.revoked

    def _load(self) -> pki.ServerTls:
        cert, key, ca, crl = self._paths
        return pki.server_tls(cert, key, ca, crl, self._config.key_passphrase)


def _stamps(paths: tuple[Path, ...]) -> tuple[Stamp, ...]:
    return tuple(stamp(path) for path in paths)
