"""`chat-certs`: make the CA, server and client certificates for mutual TLS.

Every error is one line on stderr starting with "chat-certs: " and exit status 2
(chat/cli_common.py). A certificate written or shown that ends within 30 days gets one
"chat-certs: warning: " line on stderr, the exit status unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from chat import pki
from chat.cli_common import EXIT_OK, Parser, add_passphrase_option, run_main
from chat.pki import DevPki, KeyPassphraseRequired, PkiError

PROG = "chat-certs"
DEFAULT_DIR = Path("certs")
CA_DAYS = 3650  # a development CA outlives the certificates it signs
SERVER_DAYS = 825  # the longest leaf validity browsers and Apple platforms still accept
CLIENT_DAYS = 365
CA_PASSPHRASE_FLAG = "--ca-passphrase-env"

DESCRIPTION = """\
Make the certificates for chat's mutual TLS (ECDSA P-256, PEM files).

Files in a certs directory (default ./certs, created 0700):
  ca.crt              the CA certificate: servers and clients trust it     (0644)
  ca.key              the CA private key: only chat-certs needs it        (0600)
  server.crt/.key     the server's certificate and key                    (0644/0600)
  crl.pem             revoked client certificates, checked at TLS handshake (0644)
  NAME.crt/NAME.key   a client; the certificate's CN is the user's identity (0644/0600)

Keys are created with mode 0600 from the start; no file is ever overwritten unless
--force is given. --passphrase-env VAR encrypts the new keys with the passphrase in the
environment variable VAR (never on the command line, where `ps` would show it).

Quick start:  chat-certs init && chat-certs client alice && chat-certs client bob

Any certificate written or shown that expires within 30 days is named in a warning
on stderr.
"""

INIT_HELP = """\
Create the CA (ca.crt, ca.key), the server certificate (server.crt, server.key) for
localhost, 127.0.0.1 and ::1 plus every --san, and an empty CRL (crl.pem). Refuses if any
of those files exists, unless --force (which replaces them all: client certificates signed
by the old CA stop working). --passphrase-env encrypts both ca.key and server.key.
"""

CLIENT_HELP = """\
Create DIR/NAME.crt and DIR/NAME.key for user NAME (A-Z a-z 0-9 _ . @ -, at most 64),
signed by DIR/ca.key. The certificate's subject CN is NAME: the identity the server sees.
Refuses to overwrite unless --force. To replace a compromised certificate, revoke it first.
"""

REVOKE_HELP = """\
Add DIR/NAME.crt to DIR/crl.pem, re-signed with DIR/ca.key (crl.pem is replaced
atomically). A running chat-server re-reads crl.pem within 2 seconds: the certificate can
no longer connect, and its open connections end with ERROR "certificate revoked".
"""

ROTATE_SERVER_HELP = """\
Replace DIR/server.crt and DIR/server.key with a new pair signed by DIR/ca.key, for the
same host names and IP addresses as the current certificate unless --san is given (then
localhost, 127.0.0.1, ::1 and every --san). Each file is replaced atomically; a running
chat-server presents the new certificate to new connections within 2 seconds (or at once
on SIGHUP). If server.key is encrypted, --passphrase-env must name its passphrase: the new
key is encrypted with it, as the server expects.
"""

SHOW_HELP = """\
Print a certificate's subject CN, issuer, serial, expiry, SANs and x5t#S256 thumbprint
(the value access tokens are bound to).
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0, 2 after one line on stderr, 130)."""
    return run_main(PROG, partial(_main, argv), (PkiError,))


def _main(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], None] = args.command
    command(args)
    return EXIT_OK


def _build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog=PROG, description=DESCRIPTION, formatter_class=raw)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    init = commands.add_parser(
        "init",
        help="create CA, server certificate and empty CRL",
        description=INIT_HELP,
        formatter_class=raw,
    )
    _dir_option(init)
    init.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name or IP address for the server (repeatable)",
    )
    init.add_argument(
        "--days",
        type=int,
        default=SERVER_DAYS,
        help=f"server certificate validity (default {SERVER_DAYS}; CA {CA_DAYS})",
    )
    _passphrase_option(init, "encrypt ca.key and server.key")
    _force_option(init)
    init.set_defaults(command=_init)
    client = commands.add_parser(
        "client",
        help="create a client certificate NAME.crt/.key",
        description=CLIENT_HELP,
        formatter_class=raw,
    )
    client.add_argument("name", metavar="NAME", help="the user's identity (certificate CN)")
    _dir_option(client)
    client.add_argument(
        "--days", type=int, default=CLIENT_DAYS, help=f"validity in days (default {CLIENT_DAYS})"
    )
    _passphrase_option(client, "encrypt NAME.key")
    _ca_passphrase_option(client)
    _force_option(client)
    client.set_defaults(command=_client)
    revoke = commands.add_parser(
        "revoke",
        help="revoke NAME's certificate (crl.pem)",
        description=REVOKE_HELP,
        formatter_class=raw,
    )
    revoke.add_argument("name", metavar="NAME", help="whose DIR/NAME.crt to revoke")
    _dir_option(revoke)
    _ca_passphrase_option(revoke)
    revoke.set_defaults(command=_revoke)
    rotate = commands.add_parser(
        "rotate-server",
        help="replace server.crt/.key with a new pair",
        description=ROTATE_SERVER_HELP,
        formatter_class=raw,
    )
    _dir_option(rotate)
    rotate.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="a host name or IP address for the new certificate (repeatable; default: the "
        "current certificate's)",
    )
    rotate.add_argument(
        "--days", type=int, default=SERVER_DAYS, help=f"validity in days (default {SERVER_DAYS})"
    )
    _passphrase_option(rotate, "server.key is encrypted: open it and encrypt the new one")
    _ca_passphrase_option(rotate)
    rotate.set_defaults(command=_rotate_server)
    show = commands.add_parser(
        "show", help="describe a certificate file", description=SHOW_HELP, formatter_class=raw
    )
    show.add_argument("file", metavar="FILE", type=Path, help="a PEM or DER certificate")
    show.set_defaults(command=_show)
    return parser


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        dest="directory",
        metavar="DIR",
        help=f"the certs directory (default {DEFAULT_DIR})",
    )


def _passphrase_option(parser: argparse.ArgumentParser, what: str) -> None:
    add_passphrase_option(parser, f"{what} with the passphrase in environment variable VAR")


def _ca_passphrase_option(parser: argparse.ArgumentParser) -> None:
    add_passphrase_option(
        parser,
        "ca.key is encrypted: its passphrase is in environment variable VAR",
        flag=CA_PASSPHRASE_FLAG,
    )


def _force_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace existing files")


# ---------------------------------------------------------------- subcommands


def _init(args: argparse.Namespace) -> None:
    layout = DevPki.at(args.directory)
    passphrase: bytes | None = args.passphrase
    targets = [layout.ca, layout.ca_key, layout.server_cert, layout.server_key, layout.crl]
    ca_key, ca_cert = pki.make_ca(days=CA_DAYS)
    server_key, server_cert = pki.make_server_cert(ca_key, ca_cert, args.san, args.days)
    _clear(targets, args.force)
    _make_dir(layout.directory)
    pki.write_private_key(layout.ca_key, ca_key, passphrase)
    pki.write_certificate(layout.ca, ca_cert)
    pki.write_private_key(layout.server_key, server_key, passphrase)
    pki.write_certificate(layout.server_cert, server_cert)
    pki.write_crl(layout.crl, pki.make_crl(ca_key, ca_cert))
    _report_written(targets, passphrase is not None)
    print(f"server names: {', '.join(pki.san_strings(server_cert))}")
    print(f"next: {PROG} client alice{_dir_flag(args.directory)}")
    _warn_expiring((layout.ca, ca_cert), (layout.server_cert, server_cert))


def _client(args: argparse.Namespace) -> None:
    layout = DevPki.at(args.directory)
    crt, key = layout.client(args.name)
    passphrase: bytes | None = args.passphrase
    ca_key, ca_cert = _load_ca(layout, args.ca_passphrase)
    client_key, client_cert = pki.make_client_cert(ca_key, ca_cert, args.name, args.days)
    _clear([crt, key], args.force)
    pki.write_private_key(key, client_key, passphrase)
    pki.write_certificate(crt, client_cert)
    _report_written([crt, key], passphrase is not None)
    print(f"identity: {args.name}  x5t#S256: {_thumbprint(client_cert)}")
    print(f"next: connect as {args.name} with {crt} and {key}, trusting {layout.ca}")
    _warn_expiring((layout.ca, ca_cert), (crt, client_cert))


def _revoke(args: argparse.Namespace) -> None:
    layout = DevPki.at(args.directory)
    try:
        serial = pki.revoke(layout.directory, args.name, args.ca_passphrase)
    except KeyPassphraseRequired as exc:
        raise KeyPassphraseRequired(exc.path, CA_PASSPHRASE_FLAG) from None
    print(f"revoked {args.name} (serial {serial:#x}) in {layout.crl}")
    print(
        "next: nothing; chat-server re-reads crl.pem within 2 s: new handshakes fail and "
        "open connections end"
    )


def _rotate_server(args: argparse.Namespace) -> None:
    layout = DevPki.at(args.directory)
    ca_key, ca_cert = _load_ca(layout, args.ca_passphrase)
    cert = pki.rotate_server(layout, (ca_key, ca_cert), args.san, args.days, args.passphrase)
    _report_written([layout.server_key, layout.server_cert], args.passphrase is not None)
    print(f"server names: {', '.join(pki.san_strings(cert))}")
    print("next: nothing; a running chat-server presents it to new connections within 2 s")
    _warn_expiring((layout.ca, ca_cert), (layout.server_cert, cert))


def _show(args: argparse.Namespace) -> None:
    cert = pki.load_certificate(args.file)
    sans = pki.san_strings(cert)
    print(f"subject CN: {pki.identity_or_dn(cert)}")
    print(f"issuer:     {cert.issuer.rfc4514_string()}")
    print(f"serial:     {cert.serial_number:#x}")
    print(f"not before: {cert.not_valid_before_utc.isoformat()}")
    print(f"not after:  {cert.not_valid_after_utc.isoformat()}")
    print(f"SANs:       {', '.join(sans) if sans else '(none)'}")
    print(f"x5t#S256:   {_thumbprint(cert)}")
    _warn_expiring((args.file, cert))


# ---------------------------------------------------------------- helpers


def _load_ca(layout: DevPki, passphrase: bytes | None) -> tuple[pki.SigningKey, x509.Certificate]:
    try:
        return pki.load_ca(layout, passphrase)
    except KeyPassphraseRequired as exc:
        raise KeyPassphraseRequired(exc.path, CA_PASSPHRASE_FLAG) from None


def _clear(targets: Sequence[Path], force: bool) -> None:
    """Refuse if any target exists, or with --force remove them so they can be re-created."""
    existing = [path for path in targets if path.exists()]
    if existing and not force:
        raise PkiError(f"{existing[0]} already exists; refusing to overwrite it (--force)")
    for path in existing:
        try:
            path.unlink()
        except OSError as exc:
            raise PkiError(f"cannot remove {path}: {exc.strerror}") from None


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=pki.DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {directory}: {exc.strerror}") from None


def _report_written(paths: Sequence[Path], encrypted: bool) -> None:
    for path in paths:
        mode = path.stat().st_mode & 0o777
        note = ", encrypted" if encrypted and path.suffix == ".key" else ""
        print(f"wrote {path} ({mode:04o}{note})")


def _warn_expiring(*certificates: tuple[Path, x509.Certificate]) -> None:
    """One stderr line per certificate that ends soon: renewing it is the operator's move."""
    now = datetime.now(UTC)
    for path, cert in certificates:
        warning = pki.expiry_warning(cert, path, now)
        if warning is not None:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)


def _thumbprint(cert: x509.Certificate) -> str:
    return pki.thumbprint(cert.public_bytes(Encoding.DER))


def _dir_flag(directory: Path) -> str:
    return "" if directory == DEFAULT_DIR else f" --dir {directory}"
