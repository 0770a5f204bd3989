"""`chat-server`: run the server, or act on its state (revoke, unrevoke, rotate keys)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from chat import pki
from chat.server.app import ChatServer
from chat.server.config import DEFAULT_PORT, ConfigError, ServerConfig
from chat.store.keys import KeyStore
from chat.store.state import StateStore
from chat.tokens import TokenConfigError

PROG = "chat-server"
DEV_CLIENTS = ("alice", "bob")


class UsageError(Exception):
    """A one-line message for the operator; exit code 2."""


def _heartbeat(value: str) -> tuple[int, int]:
    try:
        send, receive = (int(part) for part in value.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected two integers in ms, e.g. 10000,10000") from exc
    if send < 0 or receive < 0:
        raise argparse.ArgumentTypeError("heart-beat intervals cannot be negative")
    return send, receive


def _serve_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Secure chat server: STOMP 1.2 over WebSocket over mutual TLS, one port. "
        "Routes: wss://HOST:PORT/ws (STOMP; offer subprotocols v12.stomp and bearer.<token>), "
        "POST /auth/token, POST /auth/refresh, GET /.well-known/jwks.json, GET /healthz. "
        "With no certificate options it uses CERTS_DIR and creates development certificates "
        "there if none exist.",
        epilog="Other commands: 'chat-server revoke --sub NAME | --jti ID', "
        "'chat-server unrevoke --sub NAME', 'chat-server keys rotate' (each takes --state-dir; "
        "see their --help).",
    )
    p.add_argument(
        "--mtls",
        action="store_true",
        help="serve mutual TLS (the only mode; accepted for explicitness)",
    )
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)")
    p.add_argument(
        "--certs-dir",
        type=Path,
        default=d.certs_dir,
        help="folder with server.crt, server.key, ca.crt, crl.pem (default %(default)s)",
    )
    p.add_argument("--cert", type=Path, help="server certificate (default CERTS_DIR/server.crt)")
    p.add_argument("--key", type=Path, help="server private key (default CERTS_DIR/server.key)")
    p.add_argument(
        "--ca",
        type=Path,
        help="CA bundle client certificates must chain to (default CERTS_DIR/ca.crt)",
    )
    p.add_argument(
        "--crl",
        type=Path,
        help="certificate revocation list, re-read when it "
        "changes (default CERTS_DIR/crl.pem, if present)",
    )
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the server key's passphrase",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=d.state_dir,
        help="signing keys and token database (default %(default)s)",
    )
    p.add_argument(
        "--trust-jwks",
        nargs=2,
        action="append",
        default=[],
        metavar=("FILE", "ISS"),
        help="also accept access tokens from an external identity provider: its JWK Set file "
        "and its `iss`; its tokens must carry aud=chat, sub = the certificate CN and "
        "cnf.x5t#S256 like ours (repeatable)",
    )
    p.add_argument(
        "--token-lifetime",
        type=float,
        default=d.token_lifetime,
        metavar="SECONDS",
        help="access token lifetime (default %(default)s)",
    )
    p.add_argument(
        "--refresh-lifetime",
        type=float,
        default=d.refresh_lifetime,
        metavar="SECONDS",
        help="refresh token lifetime (default %(default)s)",
    )
    p.add_argument(
        "--clock-leeway",
        type=float,
        default=d.clock_leeway,
        metavar="SECONDS",
        help="tolerated clock skew when checking tokens (default %(default)s)",
    )
    p.add_argument(
        "--heartbeat",
        type=_heartbeat,
        default=d.heartbeat,
        metavar="SEND,RECV",
        help="STOMP heart-beat offer in ms (default 10000,10000; 0 disables a side)",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=d.max_frame_bytes,
        help="largest STOMP frame accepted (default %(default)s)",
    )
    p.add_argument(
        "--max-subscriptions",
        type=int,
        default=d.max_subscriptions,
        help="subscriptions per connection (default %(default)s)",
    )
    p.add_argument(
        "--outbound-buffer-bytes",
        type=int,
        default=d.outbound_buffer_bytes,
        help="unsent bytes after which a slow consumer is closed (default %(default)s)",
    )
    p.add_argument(
        "--history",
        choices=["sqlite", "memory"],
        default=d.history,
        help="where messages are kept for resume: sqlite (STATE_DIR/history.db; a RECEIPT for "
        "a SEND means it is on disk) or memory (lost on restart) (default %(default)s)",
    )
    p.add_argument(
        "--retention-count",
        type=int,
        default=d.retention_count,
        help="messages kept per topic for resume (default %(default)s)",
    )
    p.add_argument(
        "--retention-age",
        type=float,
        default=d.retention_age,
        metavar="SECONDS",
        help="how long a message is kept for resume (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, time connections get to close (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default %(default)s)",
    )
    return p


def _passphrase(var: str | None) -> bytes | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise UsageError(f"environment variable {var} (from --passphrase-env) is not set")
    return value.encode()


def _config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        certs_dir=args.certs_dir,
        cert=args.cert,
        key=args.key,
        ca=args.ca,
        crl=args.crl,
        key_passphrase=_passphrase(args.passphrase_env),
        state_dir=args.state_dir,
        trusted_jwks=tuple((Path(path), iss) for path, iss in args.trust_jwks),
        token_lifetime=args.token_lifetime,
        refresh_lifetime=args.refresh_lifetime,
        clock_leeway=args.clock_leeway,
        heartbeat=args.heartbeat,
        max_frame_bytes=args.max_frame_bytes,
        max_subscriptions=args.max_subscriptions,
        outbound_buffer_bytes=args.outbound_buffer_bytes,
        shutdown_grace=args.shutdown_grace,
        history=args.history,
        retention_count=args.retention_count,
        retention_age=args.retention_age,
    )


def _ensure_dev_certs(args: argparse.Namespace) -> None:
    """Quick start: with no explicit certificate paths, create dev material if it is missing."""
    if args.cert or args.key or args.ca:
        return
    dev, created = pki.ensure_dev_pki(args.certs_dir, DEV_CLIENTS)
    if created:
        print(
            f"{PROG}: created development certificates in {dev.directory}/ "
            f"(CA, server, clients {', '.join(DEV_CLIENTS)})",
            file=sys.stderr,
        )


async def _serve(config: ServerConfig) -> None:
    server = ChatServer(config)
    try:
        listeners = await server.listen()
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        raise UsageError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run, listeners)
        _print_hint(config, port)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logging.getLogger("chat.server").info(
                    "%s: closing connections (1001)", signal.Signals(signum).name
                )
                server.shutdown()
                break


def _print_hint(config: ServerConfig, port: int) -> None:
    client = config.certs_dir / f"{DEV_CLIENTS[0]}.crt"
    url = f"wss://{config.host}:{port}/ws"
    hint = f"--cert {client}" + ("" if port == DEFAULT_PORT else f" --url {url}")
    print(
        f"{PROG}: ready on https://{config.host}:{port}  (STOMP: {url})\n"
        f"{PROG}: connect a client with:  chat-client {hint}",
        file=sys.stderr,
        flush=True,
    )


def _run_server(argv: Sequence[str]) -> int:
    args = _serve_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _ensure_dev_certs(args)
    trio.run(_serve, _config(args))
    return 0


def _state_parser(command: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} {command}", description=description)
    p.add_argument(
        "--state-dir",
        type=Path,
        default=ServerConfig().state_dir,
        help="the server's state directory (default %(default)s)",
    )
    return p


def _revoke(argv: Sequence[str]) -> int:
    p = _state_parser(
        "revoke",
        "Revoke an identity (every token of it, and block new ones) "
        "or one access token. Live connections close within seconds, also when "
        "the server runs in another process.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--sub", help="identity (certificate CN) to block")
    who.add_argument("--jti", help="id of one access token to revoke")
    p.add_argument(
        "--token-lifetime",
        type=float,
        default=ServerConfig().token_lifetime,
        help="the server's access token lifetime, to know when a --jti entry "
        "can be forgotten (default %(default)s)",
    )
    args = p.parse_args(argv)
    store = StateStore.open(args.state_dir / "state.db")
    try:
        now = time.time()
        if args.sub:
            store.revoke_sub(args.sub, now)
            print(
                f"revoked identity '{args.sub}': its tokens are refused and it gets no new ones "
                f"(undo with: {PROG} unrevoke --sub {args.sub})"
            )
        else:
            store.revoke_jti(args.jti, now + args.token_lifetime + ServerConfig().clock_leeway)
            print(f"revoked token {args.jti}")
    finally:
        store.close()
    return 0


def _unrevoke(argv: Sequence[str]) -> int:
    p = _state_parser("unrevoke", "Lift an identity block set by 'revoke --sub'.")
    p.add_argument("--sub", required=True, help="identity to unblock")
    args = p.parse_args(argv)
    store = StateStore.open(args.state_dir / "state.db")
    try:
        if not store.unrevoke_sub(args.sub):
            raise UsageError(f"identity '{args.sub}' is not revoked")
    finally:
        store.close()
    print(f"identity '{args.sub}' may connect again")
    return 0


def _keys(argv: Sequence[str]) -> int:
    p = _state_parser(
        "keys",
        "Manage token signing keys. 'rotate' makes a new active key; "
        "old keys keep verifying until their tokens have expired.",
    )
    p.add_argument("action", choices=["rotate", "list"])
    args = p.parse_args(argv)
    keys = KeyStore.open(args.state_dir / "keys")
    if args.action == "rotate":
        print(
            f"new active signing key {keys.rotate(time.time())}; "
            "a running server picks it up for new tokens"
        )
    for jwk in keys.jwks()["keys"]:
        marker = "*" if jwk["kid"] == keys.active_kid else " "
        print(f"{marker} {jwk['kid']} {jwk['alg']}")
    return 0


COMMANDS = {"revoke": _revoke, "unrevoke": _unrevoke, "keys": _keys}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else _run_server(argv)
    except (UsageError, ConfigError, pki.PkiError, TokenConfigError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
