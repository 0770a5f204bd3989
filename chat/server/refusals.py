"""Refused TLS handshakes, told to the operator without letting an attacker flood the log.

`refusal_reason` names why a client's handshake failed (PROTOCOL.md §1: no certificate,
another CA's, expired, revoked); `LogRate` lets a few such lines through per window and
counts the rest for one summary line. Pure: no trio, no logging.
"""

from __future__ import annotations

import ssl

# OpenSSL's X509_V_ERR_* codes for a client certificate, in the words of PROTOCOL.md §1
_VERIFY_REASONS = {
    2: "unknown CA",  # unable to get issuer certificate
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown CA",  # self-signed leaf
    19: "unknown CA",  # self-signed certificate in the chain
    20: "unknown CA",  # unable to get local issuer certificate
    23: "certificate revoked",
    26: "certificate not for client use",  # unsupported purpose
}
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no certificate",
    "WRONG_VERSION_NUMBER": "not TLS",
    "HTTP_REQUEST": "not TLS (plain HTTP)",
    "UNSUPPORTED_PROTOCOL": "TLS version too old",
    "NO_SHARED_CIPHER": "no shared cipher",
}


def refusal_reason(error: BaseException) -> str | None:
    """Why TLS refused the peer, from a failed handshake's exception (trio raises
    BrokenResourceError from the ssl.SSLError); None when the peer just went away."""
    cause = error if isinstance(error, ssl.SSLError) else error.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(cause.verify_code, cause.verify_message)
    if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
        reason = getattr(cause, "reason", None) or "TLS error"  # the ssl module may not say
        return _SSL_REASONS.get(reason, reason.lower().replace("_", " "))
    return None


class LogRate:
    """At most `limit` lines per `window` seconds; the lines held back are counted so the
    shell can log one summary per window instead."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._start = float("-inf")
        self._passed = 0
        self._held = 0

    def allow(self, now: float) -> bool:
        """Whether a line at `now` may be logged; False counts it as held back."""
        if now - self._start >= self.window:
            self._start, self._passed = now, 0
        if self._passed < self.limit:
            self._passed += 1
            return True
        self._held += 1
        return False

    def held_back(self) -> int:
        """Lines held back since the last call (then forgotten: each is summarized once)."""
        held, self._held = self._held, 0
        return held
