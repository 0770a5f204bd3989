"""The server's one configuration object: every default and every bound lives here.

A field made with `option()` is also a `chat-server` option: its help, flag name and parser
sit beside its default, and the CLI derives its options and `--help` from these fields.
Fields without one are bounds the command line does not offer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from chat.cli_common import option
from chat.protocol import wire

DEFAULT_PORT = 8443
# The outbound buffer must hold a couple of the largest frames, or healthy readers get evicted.
MIN_BUFFER_FRAMES = 2
HISTORY_KINDS = ("sqlite", "memory")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

# --help groups, in the order the README's "Server options" names them
LISTENER = "listener"
CERTIFICATES = "certificates"
STATE = "state"
TOKENS = "tokens"
STOMP = "STOMP"
LIMITS = "limits"
HISTORY = "history"
SHUTDOWN = "shutdown"
LOGGING = "logging"


_NO_MAX = float("inf")
_TINY = 0.001  # the smallest interval that still means something
# Each numeric setting's working range; a value outside is a one-line ConfigError.
_BOUNDS: tuple[tuple[str, float, float], ...] = (
    ("port", 0, 65535),
    ("token_lifetime", 1, _NO_MAX),
    ("refresh_lifetime", 1, _NO_MAX),
    ("clock_leeway", 0, 3600),
    ("max_frame_bytes", 1024, wire.MAX_FRAME_BYTES),  # under 1 KiB no CONNECT with a token fits
    ("max_headers", 4, wire.MAX_HEADERS),  # CONNECT needs accept-version and host
    ("max_subscriptions", 1, 100_000),
    ("outbound_buffer_bytes", 1, _NO_MAX),
    ("max_connections", 1, 10_000_000),
    ("max_handshakes", 1, 10_000_000),
    ("max_connections_per_identity", 1, 10_000_000),
    ("max_subscriptions_per_identity", 1, 100_000_000),
    ("token_rate", _TINY, _NO_MAX),
    ("token_burst", 1, _NO_MAX),
    ("max_refresh_families", 1, 1_000_000),
    ("publish_rate", 0, _NO_MAX),
    ("publish_burst", 1, _NO_MAX),
    ("handshake_timeout", _TINY, 3600),
    ("connect_timeout", _TINY, 3600),
    ("close_timeout", _TINY, 3600),
    ("retention_count", 0, _NO_MAX),
    ("retention_age", 0, _NO_MAX),
    ("retention_bytes", 0, _NO_MAX),
    ("history_memory_bytes", 0, _NO_MAX),
    ("max_topics", 2, _NO_MAX),  # a direct message needs both inboxes in memory at once
    ("shutdown_grace", 0, 3600),
    ("revocation_poll", _TINY, 3600),
)


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class ConfigError(ValueError):
    """Settings that cannot work together; the CLI prints it as one line and exits 2."""


def parse_heartbeat(text: str) -> tuple[int, int]:
    """`--heartbeat SEND,RECV` in ms (PROTOCOL.md §5); ValueError says what is wrong."""
    try:
        send, receive = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError("expected two integers in ms, e.g. 10000,10000") from None
    if send < 0 or receive < 0:
        raise ValueError("heart-beat intervals cannot be negative")
    return send, receive


def parse_address(text: str) -> tuple[str, int]:
    """`--metrics HOST:PORT` (an IPv6 host in brackets); ValueError says what is wrong."""
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:9100, not {text!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0 to 65535, not {port}")
    return host, int(port)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """`--trusted-proxy CIDR[,CIDR]`; ValueError says what is wrong."""
    try:
        return tuple(ipaddress.ip_network(part.strip()) for part in text.split(","))
    except ValueError as exc:
        raise ValueError(f"expected CIDR[,CIDR], e.g. 127.0.0.1/32,10.0.0.0/8: {exc}") from None


def _jwks_source(path: str, issuer: str) -> tuple[Path, str]:
    return Path(path), issuer


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `chat-server` can be told; its options are made from these fields."""

    host: str = option("127.0.0.1", "address to listen on", group=LISTENER)
    port: int = option(DEFAULT_PORT, "TCP port (0: any free port)", group=LISTENER)
    metrics: tuple[str, int] | None = option(
        None,
        "serve GET /metrics (Prometheus text format) in plain HTTP on HOST:PORT; keep it "
        "on a private address",
        group=LISTENER,
        metavar="HOST:PORT",
        parse=parse_address,
        shown="off",
    )
    proxy_listen: tuple[str, int] | None = option(
        None,
        "also serve the same routes in plain HTTP on HOST:PORT behind a TLS-terminating "
        "proxy, which forwards the client certificate in X-SSL-Client-Cert (verified here); "
        "only --trusted-proxy addresses may connect",
        group=LISTENER,
        metavar="HOST:PORT",
        parse=parse_address,
        shown="off",
    )
    trusted_proxy: tuple[Network, ...] = option(
        (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        "addresses that may connect to --proxy-listen (others: 403 untrusted_proxy)",
        group=LISTENER,
        metavar="CIDR[,CIDR]",
        parse=parse_networks,
        shown="127.0.0.1/32,::1/128",
    )
    certs_dir: Path = option(
        Path("certs"),
        "folder with server.crt, server.key, ca.crt, crl.pem (re-read when they change, and on "
        "SIGHUP); with none of --cert, --key, --ca, development certificates are created there "
        "if it has none",
        group=CERTIFICATES,
    )
    # Explicit paths override the files in certs_dir (server.crt, server.key, ca.crt, crl.pem).
    cert: Path | None = option(
        None, "server certificate", group=CERTIFICATES, shown="CERTS_DIR/server.crt"
    )
    key: Path | None = option(
        None, "server private key", group=CERTIFICATES, shown="CERTS_DIR/server.key"
    )
    ca: Path | None = option(
        None,
        "CA bundle client certificates must chain to",
        group=CERTIFICATES,
        shown="CERTS_DIR/ca.crt",
    )
    crl: Path | None = option(
        None,
        "certificate revocation list; a revoked client's open connections end too",
        group=CERTIFICATES,
        shown="CERTS_DIR/crl.pem, if present",
    )
    key_passphrase: bytes | None = option(
        None,
        "the server key is encrypted: its passphrase is in environment variable VAR",
        group=CERTIFICATES,
        flag="--passphrase-env",
        secret_env=True,
        repr=False,
    )
    state_dir: Path = option(
        Path("state"),
        "signing keys, the token database and the message history",
        group=STATE,
    )
    acl: Path | None = option(
        None,
        "the policy file (TOML): who may subscribe, publish and send direct messages; "
        "re-read when it changes",
        group=STATE,
        metavar="FILE",
        shown="STATE_DIR/acl.toml, written with an allow-all policy on first start",
    )
    issuer: str = "chat"
    # External identity providers whose tokens are accepted too: (JWK Set file, their `iss`).
    trusted_jwks: tuple[tuple[Path, str], ...] = option(
        (),
        "also accept access tokens from an external identity provider: its JWK Set file "
        "and its `iss`; its tokens must carry aud=chat, sub = the certificate CN and "
        "cnf.x5t#S256 like ours (repeatable)",
        group=TOKENS,
        flag="--trust-jwks",
        metavar=("FILE", "ISS"),
        parse=_jwks_source,
        repeat=True,
    )
    # access tokens are short-lived: 5 minutes
    token_lifetime: float = option(300.0, "access token lifetime", group=TOKENS, metavar="SECONDS")
    # refresh tokens: 14 days
    refresh_lifetime: float = option(
        14 * 86400.0, "refresh token lifetime", group=TOKENS, metavar="SECONDS"
    )
    # tolerated clock skew on exp/nbf
    clock_leeway: float = option(
        30.0, "tolerated clock skew when checking tokens", group=TOKENS, metavar="SECONDS"
    )
    # STOMP heart-beat offer (PROTOCOL.md §5): what we can send, what we want to receive, ms.
    heartbeat: tuple[int, int] = option(
        (10_000, 10_000),
        "STOMP heart-beat offer in ms: what we send, what we want to receive; 0 disables a side",
        group=STOMP,
        metavar="SEND,RECV",
        parse=parse_heartbeat,
    )
    # one STOMP frame, headers and body
    max_frame_bytes: int = option(
        64 * 1024, "largest STOMP frame accepted", group=STOMP, metavar="BYTES"
    )
    max_headers: int = 32  # per STOMP frame
    max_subscriptions: int = option(128, "subscriptions per connection", group=STOMP, metavar="N")
    # A connection whose unsent bytes exceed this is a slow consumer and is closed.
    outbound_buffer_bytes: int = option(
        4 * 1024 * 1024,
        "unsent bytes after which a slow consumer is closed",
        group=STOMP,
        metavar="BYTES",
    )
    # Limits (PROTOCOL.md §12, first point): what one client, or many idle sockets, can take.
    max_connections: int = option(
        10_000,
        "open connections in all (TLS handshakes included); beyond it the oldest unfinished "
        "handshakes are shed first, then new connections are closed at once",
        group=LIMITS,
        metavar="N",
    )
    max_handshakes: int = option(
        256,
        "TLS handshakes and request heads in progress at once; a new one beyond it sheds the "
        "oldest unfinished one",
        group=LIMITS,
        metavar="N",
    )
    max_connections_per_identity: int = option(
        32,
        "WebSocket connections one identity may hold (beyond: 429 too_many_connections)",
        group=LIMITS,
        metavar="N",
    )
    max_subscriptions_per_identity: int = option(
        1024,
        "subscriptions one identity may hold across all its connections",
        group=LIMITS,
        metavar="N",
    )
    token_rate: float = option(
        1.0,
        "token requests (POST /auth/token, /auth/refresh) per second and identity, on average "
        "(beyond: 429 rate_limited with Retry-After)",
        group=LIMITS,
        metavar="PER_S",
    )
    token_burst: int = option(
        10, "token requests one identity may make at once", group=LIMITS, metavar="N"
    )
    max_refresh_families: int = option(
        16,
        "refresh-token families (logged-in devices) per identity; a new one expires the oldest",
        group=LIMITS,
        metavar="N",
    )
    publish_rate: float = option(
        1000.0,
        "SENDs per second and connection, on average; a faster publisher is read more slowly, "
        "never dropped (0: no limit)",
        group=LIMITS,
        metavar="PER_S",
    )
    publish_burst: int = option(
        1000, "SENDs a connection may make at once", group=LIMITS, metavar="N"
    )
    handshake_timeout: float = 10.0  # TLS handshake + HTTP request head
    connect_timeout: float = 10.0  # WebSocket open until STOMP CONNECT
    close_timeout: float = 2.0  # how long we wait for the peer's close frame
    # "sqlite" (state_dir/history.db, survives crashes) or "memory"
    history: str = option(
        "sqlite",
        "where messages are kept for resume: sqlite (STATE_DIR/history.db; a RECEIPT for "
        "a SEND means it is on disk) or memory (lost on restart)",
        group=HISTORY,
        choices=HISTORY_KINDS,
    )
    retention_count: int = option(
        1000, "messages kept per topic for resume", group=HISTORY, metavar="N"
    )
    retention_age: float = option(
        7 * 86400.0, "how long a message is kept for resume", group=HISTORY, metavar="SECONDS"
    )
    retention_bytes: int = option(
        16 * 1024 * 1024,
        "message bytes kept per topic for resume (the oldest go first)",
        group=HISTORY,
        metavar="BYTES",
    )
    history_memory_bytes: int = option(
        64 * 1024 * 1024,
        "message bytes kept in memory for fast replays, all topics together; older retained "
        "messages are read from disk",
        group=HISTORY,
        metavar="BYTES",
    )
    max_topics: int = option(
        100_000,
        "topics (and inboxes) held in memory; the least recently used idle ones are dropped "
        "from memory first (their history stays on disk)",
        group=HISTORY,
        metavar="N",
    )
    # SIGTERM: time connections get to close with 1001
    shutdown_grace: float = option(
        5.0,
        "on SIGINT/SIGTERM, time connections get to close",
        group=SHUTDOWN,
        metavar="SECONDS",
    )
    # how often revocations and the policy file are re-read (live sessions then re-checked)
    revocation_poll: float = 1.0
    log_level: str = option("info", "log verbosity on stderr", group=LOGGING, choices=LOG_LEVELS)
    log_format: str = option(
        "text",
        "log lines on stderr: text for people, or json (one object per line with ts, level, "
        "event, peer, sub, conn and the event's fields) for log shipping",
        group=LOGGING,
        choices=LOG_FORMATS,
    )

    def __post_init__(self) -> None:
        for name, low, high in _BOUNDS:
            value = getattr(self, name)
            if not low <= value <= high:
                flag = "--" + name.replace("_", "-")
                within = f"at least {_shown(low)}"
                if high != _NO_MAX:
                    within = f"{_shown(low)} to {_shown(high)}"
                raise ConfigError(f"{flag} must be {within}, not {_shown(value)}")
        if self.outbound_buffer_bytes < MIN_BUFFER_FRAMES * self.max_frame_bytes:
            raise ConfigError(
                f"outbound buffer ({self.outbound_buffer_bytes} bytes) must hold at least "
                f"{MIN_BUFFER_FRAMES} frames of the largest size ({self.max_frame_bytes} bytes)"
            )
        if self.history not in HISTORY_KINDS:
            raise ConfigError(f"history must be sqlite or memory, not {self.history!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}")

    def cert_path(self) -> Path:
        return self.cert or self.certs_dir / "server.crt"

    def key_path(self) -> Path:
        return self.key or self.certs_dir / "server.key"

    def ca_path(self) -> Path:
        return self.ca or self.certs_dir / "ca.crt"

    def crl_path(self) -> Path:
        return self.crl or self.certs_dir / "crl.pem"
