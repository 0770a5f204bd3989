"""Behind a TLS-terminating reverse proxy (PROTOCOL.md §12): who a proxied request is from.

How this works: the `--proxy-listen` listener speaks plain HTTP, so no handshake names the
client. A connection counts only from a `--trusted-proxy` address, and its request's
`X-SSL-Client-Cert` header carries the client certificate, URL-encoded PEM as nginx's
`$ssl_client_escaped_cert` sends it. The proxy's word is not taken for it: the certificate
is checked here as the handshake checks it on the TLS listener, against the CA bundle and CRL
in force (`TlsContexts`, so a reload applies here too), with the CN rules of
`pki.client_identity`. The TLS listener never reads this header. Pure module: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from chat import pki
from chat.protocol.errors import HttpRefusal
from chat.server.config import Network
from chat.server.http_api import Peer, Request
from chat.server.tls import TlsContexts

CLIENT_CERT_HEADER = "x-ssl-client-cert"  # h11 gives header names in lower case


class UntrustedProxy(HttpRefusal):
    """A connection to the proxy listener from outside `--trusted-proxy`."""

    status = 403
    code = "untrusted_proxy"


class InvalidClientCertificate(HttpRefusal):
    """No forwarded certificate, or one the TLS listener's handshake would refuse."""

    status = 401
    code = "invalid_client_certificate"


class ProxyGate:
    """Turns a proxied request into the `Peer` a TLS handshake would have established."""

    def __init__(
        self, trusted: tuple[Network, ...], tls: TlsContexts, clock: Callable[[], float]
    ) -> None:
        self._trusted = trusted
        self._tls = tls
        self._clock = clock

    def identify(self, address: str, request: Request) -> Peer:
        """The peer of `request`, which came from `address` ("ip:port"), or a refusal."""
        if not self._is_trusted(address.rpartition(":")[0]):
            raise UntrustedProxy(f"{address} is not a trusted proxy (--trusted-proxy)")
        cert = forwarded_certificate(request.header(CLIENT_CERT_HEADER))
        now = datetime.fromtimestamp(self._clock(), UTC)
        try:
            self._tls.verify_client(cert, now)
            der = cert.public_bytes(Encoding.DER)
            identity = pki.client_identity(der)
        except pki.PkiError as exc:
            raise InvalidClientCertificate(str(exc)) from None
        return Peer(identity, pki.thumbprint(der), address, cert.serial_number)

    def _is_trusted(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)


def forwarded_certificate(value: str | None) -> x509.Certificate:
    """The certificate in an `X-SSL-Client-Cert` value (URL-encoded PEM), or a refusal."""
    if not value:
        raise InvalidClientCertificate(
            f"no client certificate: the proxy must send it in {CLIENT_CERT_HEADER}"
        )
    try:
        return x509.load_pem_x509_certificate(unquote(value).encode("latin-1"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidClientCertificate(
            f"{CLIENT_CERT_HEADER} is not one URL-encoded PEM certificate"
        ) from None
