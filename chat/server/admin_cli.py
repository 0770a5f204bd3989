"""`chat-server admin publish|connections|disconnect`: the admin routes (PROTOCOL.md §12) from
the command line, with an admin's client certificate, against a running server.

It speaks to the server like any client (mutual TLS, one HTTP request), so it works on any
node and needs no access to the server's files. A refusal is one line with the server's code
and exit 2; output is a table or, with `--json`, the server's answer as it came.
"""

from __future__ import annotations

import argparse
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from chat import pki
from chat.cli_common import EXIT_OK, Parser, UsageError, add_passphrase_option
from chat.client.errors import ClientError, refusal
from chat.client.http import request
from chat.server.config import DEFAULT_PORT

DEFAULT_URL = f"https://127.0.0.1:{DEFAULT_PORT}"
ADMIN_HELP = (
    "Use the server's admin routes with an admin's certificate (one whose identity the policy "
    "marks admin = true): 'publish DESTINATION BODY' sends a message as that identity "
    "(/topic/NAME, or /user/NAME for a direct message) and prints its offset once it is "
    "stored; 'connections' lists the live connections; 'disconnect NAME' closes NAME's "
    "connections (ERROR disconnected by admin; it does not revoke NAME)."
)
# Reported as one line by chat-server's main: what can go wrong talking to a server.
ADMIN_ERRORS = (ClientError,)


def add_admin_command(commands: argparse._SubParsersAction[Parser]) -> None:
    """`admin` with its three actions, each with the connection options."""
    admin = commands.add_parser(
        "admin", help="publish, list or disconnect through a running server", description=ADMIN_HELP
    )
    actions = admin.add_subparsers(title="actions", metavar="ACTION", required=True)
    publish = _action(actions, "publish", "send a message as the admin identity", _publish)
    publish.add_argument("destination", metavar="DESTINATION", help="/topic/NAME or /user/NAME")
    publish.add_argument("body", metavar="BODY", help="the message text")
    publish.add_argument("--content-type", help="default text/plain;charset=utf-8")
    _action(actions, "connections", "list the live connections", _connections)
    disconnect = _action(actions, "disconnect", "close an identity's connections", _disconnect)
    disconnect.add_argument("name", metavar="NAME", help="the identity (certificate CN)")


Call = tuple[str, str, dict[str, str] | None]  # method, path, JSON body


def _action(
    actions: argparse._SubParsersAction[Parser],
    name: str,
    summary: str,
    call: Callable[[argparse.Namespace], Call],
) -> Parser:
    parser = actions.add_parser(name, help=summary, description=summary)
    parser.add_argument(
        "--cert", type=Path, required=True, metavar="FILE", help="an admin's client certificate"
    )
    parser.add_argument("--key", type=Path, metavar="FILE", help="default: beside --cert, .key")
    parser.add_argument("--ca", type=Path, metavar="FILE", help="default: ca.crt beside --cert")
    add_passphrase_option(parser, "the key is encrypted: its passphrase is in variable VAR")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")
    parser.set_defaults(run=lambda args: _run(args, call(args)))
    return parser


def _run(args: argparse.Namespace, call: Call) -> int:
    cert: Path = args.cert
    key, ca = args.key or cert.with_suffix(".key"), args.ca or cert.parent / "ca.crt"
    context = pki.client_ssl_context(cert, key, ca, args.passphrase)
    method, path, body = call
    answer = trio.run(_ask, args.url, method, path, context, body)
    print(json.dumps(answer, indent=2) if args.json else _shown(path, answer))
    return EXIT_OK


async def _ask(
    url: str, method: str, path: str, context: ssl.SSLContext, body: dict[str, str] | None
) -> Any:
    status, data = await request(url, method, path, context, body)
    try:
        answer = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = None
    if status != 200:
        refused = refusal(status, answer if isinstance(answer, dict) else {})
        raise UsageError(f"{method} {path} refused: HTTP {status} {refused.code}: {refused.detail}")
    if answer is None:
        raise UsageError(f"{url} answered {path} without JSON")
    return answer


def _publish(args: argparse.Namespace) -> Call:
    body = {"destination": args.destination, "body": args.body}
    if args.content_type:
        body["content_type"] = args.content_type
    return "POST", "/admin/publish", body


def _connections(args: argparse.Namespace) -> Call:
    return "GET", "/admin/connections", None


def _disconnect(args: argparse.Namespace) -> Call:
    return "POST", "/admin/disconnect", {"sub": args.name}


def _shown(path: str, answer: Any) -> str:
    """The answer for a person: one line, or a table of connections."""
    if path == "/admin/publish":
        return f"stored at offset {answer['offset']} (epoch {answer['epoch']})"
    if path == "/admin/disconnect":
        return f"disconnected {answer['disconnected']} connection(s)"
    rows = [("SUB", "PEER", "SINCE", "SUBSCRIPTIONS")]
    rows += [
        (c["sub"], c["peer"] or "-", str(c["since"]), " ".join(c["subscriptions"]) or "-")
        for c in answer
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[3]
             for row in rows]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)
