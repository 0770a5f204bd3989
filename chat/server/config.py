"""The server's one configuration object: every default and every bound lives here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 8443
# The outbound buffer must hold a couple of the largest frames, or healthy readers get evicted.
MIN_BUFFER_FRAMES = 2


class ConfigError(ValueError):
    """Settings that cannot work together; the CLI prints it as one line and exits 2."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `chat-server` can be told; the CLI maps flags onto these fields."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    certs_dir: Path = Path("certs")
    # Explicit paths override the files in certs_dir (server.crt, server.key, ca.crt, crl.pem).
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    crl: Path | None = None
    key_passphrase: bytes | None = field(default=None, repr=False)
    state_dir: Path = Path("state")
    issuer: str = "chat"
    # External identity providers whose tokens are accepted too: (JWK Set file, their `iss`).
    trusted_jwks: tuple[tuple[Path, str], ...] = ()
    token_lifetime: float = 300.0  # access tokens are short-lived: 5 minutes
    refresh_lifetime: float = 14 * 86400.0  # refresh tokens: 14 days
    clock_leeway: float = 30.0  # tolerated clock skew on exp/nbf
    # STOMP heart-beat offer (PROTOCOL.md §5): what we can send, what we want to receive, ms.
    heartbeat: tuple[int, int] = (10_000, 10_000)
    max_frame_bytes: int = 64 * 1024  # one STOMP frame, headers and body
    max_headers: int = 32  # per STOMP frame
    max_subscriptions: int = 128  # per connection
    # A connection whose unsent bytes exceed this is a slow consumer and is closed.
    outbound_buffer_bytes: int = 4 * 1024 * 1024
    handshake_timeout: float = 10.0  # TLS handshake + HTTP request head
    connect_timeout: float = 10.0  # WebSocket open until STOMP CONNECT
    close_timeout: float = 2.0  # how long we wait for the peer's close frame
    shutdown_grace: float = 5.0  # SIGTERM: time connections get to close with 1001
    history: str = "sqlite"  # "sqlite" (state_dir/history.db, survives crashes) or "memory"
    retention_count: int = 1000  # messages kept per topic for resume
    retention_age: float = 7 * 86400.0  # seconds a message is kept for resume
    revocation_poll: float = 1.0  # how often live sessions are re-checked against revocations

    def __post_init__(self) -> None:
        if self.outbound_buffer_bytes < MIN_BUFFER_FRAMES * self.max_frame_bytes:
            raise ConfigError(
                f"outbound buffer ({self.outbound_buffer_bytes} bytes) must hold at least "
                f"{MIN_BUFFER_FRAMES} frames of the largest size ({self.max_frame_bytes} bytes)"
            )
        if self.history not in ("sqlite", "memory"):
            raise ConfigError(f"history must be sqlite or memory, not {self.history!r}")

    def cert_path(self) -> Path:
        return self.cert or self.certs_dir / "server.crt"

    def key_path(self) -> Path:
        return self.key or self.certs_dir / "server.key"

    def ca_path(self) -> Path:
        return self.ca or self.certs_dir / "ca.crt"

    def crl_path(self) -> Path:
        return self.crl or self.certs_dir / "crl.pem"
