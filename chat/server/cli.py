"""`chat-server`: run the server, or act on its state (revoke, unrevoke, rotate keys).

Its options are made from `ServerConfig`'s fields (chat/server/config.py holds every default
and help text); errors are one line on stderr and exit 2 (chat/cli_common.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import trio

from chat import pki
from chat.cli_common import (
    EXIT_OK,
    Parser,
    UsageError,
    add_config_option,
    add_config_options,
    config_from,
    run_main,
)
from chat.protocol.policy import PolicyError
from chat.protocol.tokens import TokenConfigError
from chat.server import logs
from chat.server.admin_cli import ADMIN_ERRORS, add_admin_command
from chat.server.app import ChatServer
from chat.server.config import DEFAULT_PORT, ConfigError, ServerConfig
from chat.store.errors import StoreMissing, StoreUnusable
from chat.store.keys import KeyStore
from chat.store.state import StateStore

PROG = "chat-server"
DEV_CLIENTS = ("alice", "bob")

USAGE = """\
%(prog)s [serve] [OPTIONS]
       %(prog)s revoke (--sub NAME | --jti ID) [--state-dir STATE_DIR]
       %(prog)s unrevoke --sub NAME [--state-dir STATE_DIR]
       %(prog)s keys {rotate,list} [--state-dir STATE_DIR]
       %(prog)s admin {publish DEST BODY,connections,disconnect NAME} --cert FILE [--json]"""

DESCRIPTION = """\
Secure chat server: STOMP 1.2 over WebSocket over mutual TLS, one port. Routes:
wss://HOST:PORT/ws (STOMP; offer subprotocols v12.stomp and bearer.<token>),
POST /auth/token, POST /auth/refresh, GET /auth/me, GET /.well-known/jwks.json, GET /healthz,
GET /readyz, and for admins (the policy's admin = true) POST /admin/publish,
GET /admin/connections, POST /admin/disconnect; with --metrics, Prometheus metrics there;
with --proxy-listen, the same routes in plain HTTP for a TLS-terminating proxy (e.g. nginx).
With no certificate options it uses CERTS_DIR and creates development certificates
there if none exist. Serving is the default command: the options below need no 'serve'.
"""

SERVE_HELP = "run the server (the default command; takes the options below)"
REVOKE_HELP = (
    "Revoke an identity (every token of it, and block new ones) or one access token. Live "
    "connections close within seconds, also when the server runs in another process. "
    "Acts on the state of a server that has run with this --state-dir, never a new one."
)
UNREVOKE_HELP = (
    "Lift an identity block set by 'revoke --sub': it may get new tokens again, while its "
    "tokens issued up to the revocation stay refused, and so do its refresh tokens."
)
KEYS_HELP = (
    "Manage token signing keys. 'rotate' makes a new active key (a running server picks it "
    "up for new tokens); old keys keep verifying until their tokens have expired. 'list' "
    "shows them, the active one marked *."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (serving by default); the exit status (0, 2 after one line, 130)."""
    return run_main(
        PROG,
        partial(_main, argv),
        (ConfigError, pki.PkiError, TokenConfigError, StoreUnusable, PolicyError, *ADMIN_ERRORS),
    )


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.run
    return command(args)


def build_parser() -> Parser:
    """`chat-server [serve] [OPTIONS]`, `revoke`, `unrevoke`, `keys`, all in one --help.

    The serve options are the top level's (with ServerConfig's defaults) and `serve`'s (which
    set only what is given after it). A command's own option that the top level also has
    (--state-dir) likewise falls back to the top level's value, so it may come on either side.
    """
    parser = Parser(
        prog=PROG,
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", prog=PROG)
    _serve_options(parser, defaults=True)
    serve = commands.add_parser(
        "serve",
        help=SERVE_HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _serve_options(serve, defaults=False)
    _state_commands(commands)
    add_admin_command(commands)
    return parser


def _serve_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    parser.add_argument(
        "--mtls",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="serve mutual TLS (the only mode; accepted for explicitness)",
    )
    add_config_options(parser, ServerConfig, defaults=defaults)
    parser.set_defaults(run=_run_server)


def _state_commands(commands: argparse._SubParsersAction[Parser]) -> None:
    """`revoke`, `unrevoke` and `keys`: each acts on --state-dir and exits."""
    revoke = _command(
        commands, "revoke", "block an identity (--sub) or one token (--jti)", REVOKE_HELP, _revoke
    )
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--sub", metavar="NAME", help="identity (certificate CN) to block")
    who.add_argument("--jti", metavar="ID", help="id of one access token to revoke")
    add_config_option(
        revoke,
        ServerConfig,
        "token_lifetime",
        help="the server's access token lifetime, to know when a --jti entry can be forgotten",
        defaults=False,
    )
    unrevoke = _command(commands, "unrevoke", "lift an identity block", UNREVOKE_HELP, _unrevoke)
    unrevoke.add_argument("--sub", required=True, metavar="NAME", help="identity to unblock")
    keys = _command(
        commands,
        "keys",
        "rotate: make a new token signing key; list: show the keys",
        KEYS_HELP,
        _keys,
    )
    keys.add_argument("action", choices=["rotate", "list"])


def _command(
    commands: argparse._SubParsersAction[Parser],
    name: str,
    summary: str,
    description: str,
    run: Callable[[argparse.Namespace], int],
) -> Parser:
    """A command on the server's state: `name` with --state-dir, running `run`."""
    parser = commands.add_parser(name, help=summary, description=description)
    add_config_option(
        parser, ServerConfig, "state_dir", help="the server's state directory", defaults=False
    )
    parser.set_defaults(run=run)
    return parser


# ---------------------------------------------------------------- serving


def _run_server(args: argparse.Namespace) -> int:
    config = config_from(ServerConfig, args)
    logs.configure(config)
    _ensure_dev_certs(config)
    trio.run(_serve, config)
    return EXIT_OK


def _ensure_dev_certs(config: ServerConfig) -> None:
    """Quick start: with no explicit certificate paths, create dev material if it is missing."""
    if config.cert or config.key or config.ca:
        return
    # The server key's passphrase also opens an encrypted ca.key (chat-certs init encrypts
    # both with one) and encrypts a new server.key, which the server then loads with it.
    dev, created = pki.ensure_dev_pki(config.certs_dir, DEV_CLIENTS, config.key_passphrase)
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
    except OSError as exc:  # its text names the address
        raise UsageError(f"cannot listen on {exc.strerror or exc}") from exc
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run, listeners)
        _print_hint(config, port)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    server.reload_tls()
                    continue
                name = signal.Signals(signum).name
                logging.getLogger("chat.server").info(
                    "%s: closing connections (1001)",
                    name,
                    extra={"event": "shutting_down", "signal": name},
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


# ---------------------------------------------------------------- state commands


def _existing_state(args: argparse.Namespace) -> StateStore:
    with _server_state(args.state_dir):
        return StateStore.open(args.state_dir / "state.db", create=False)


def _existing_keys(args: argparse.Namespace) -> KeyStore:
    with _server_state(args.state_dir):
        return KeyStore.open(args.state_dir / "keys", create=False)


@contextmanager
def _server_state(state_dir: Path) -> Iterator[None]:
    """An operator command acts on a server's state: a directory without it is a mistake
    (a typo, the wrong --state-dir), never a new empty state to act on."""
    try:
        yield
    except StoreMissing as exc:
        raise UsageError(
            f"no server state in {state_dir} ({exc}); give the --state-dir the server uses"
        ) from exc


def _revoke(args: argparse.Namespace) -> int:
    store = _existing_state(args)
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
    return EXIT_OK


def _unrevoke(args: argparse.Namespace) -> int:
    store = _existing_state(args)
    try:
        if not store.unrevoke_sub(args.sub):
            raise UsageError(f"identity '{args.sub}' is not revoked")
    finally:
        store.close()
    print(f"identity '{args.sub}' may connect again")
    return EXIT_OK


def _keys(args: argparse.Namespace) -> int:
    keys = _existing_keys(args)
    if args.action == "rotate":
        print(
            f"new active signing key {keys.rotate(time.time())}; "
            "a running server picks it up for new tokens"
        )
    for jwk in keys.jwks()["keys"]:
        marker = "*" if jwk["kid"] == keys.active_kid else " "
        print(f"{marker} {jwk['kid']} {jwk['alg']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
