"""The server's log lines (chat/server/logs.py): the JSON shape, the fields of real events,
and the redaction of every secret, in both formats, wherever a log call puts it."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from trio_websocket import ConnectionClosed

from chat.cli_common import UsageError, config_from
from chat.client.errors import TokenRefused
from chat.server import logs
from chat.server.cli import build_parser
from chat.server.config import ConfigError, ServerConfig
from chat.store.state import StateStore
from tests.below_tls import BelowTls
from tests.conftest import RunningServer, TestPki, raw_ws
from tests.test_server_connections import refused_handshake

PASSPHRASE = "correct horse battery staple"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
log = logging.getLogger("chat.server")


@dataclass
class Captured:
    """What the handler `logs.configure` installs wrote."""

    stream: io.StringIO

    def text(self) -> str:
        return self.stream.getvalue()

    def json(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.text().splitlines()]

    def events(self, event: str) -> list[dict[str, object]]:
        return [entry for entry in self.json() if entry["event"] == event]


@pytest.fixture
def configure() -> Iterator[Callable[..., Captured]]:
    """`configure(**config_fields)`: logs.configure's handler, writing to a string."""
    root = logging.getLogger()
    level = root.level
    handlers: list[logging.Handler] = []

    def install(**fields: object) -> Captured:
        handler = logs.configure(ServerConfig(**fields))  # type: ignore[arg-type]
        stream = io.StringIO()
        handler.setStream(stream)
        handlers.append(handler)
        return Captured(stream)

    yield install
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------- the shape


def test_a_json_line_is_one_object_with_the_fields_in_order(configure) -> None:
    captured = configure(log_format="json")
    extra = {"event": "closed", "code": 1000, "conn": "s7", "sub": "alice", "peer": "::1:4"}
    log.info("closed %s: %d", "s7", 1000, extra=extra)
    [entry] = captured.json()
    assert list(entry) == [
        *("ts", "level", "logger", "event", "message"),
        *("peer", "sub", "conn", "code"),
    ]
    assert TIMESTAMP.fullmatch(str(entry["ts"]))
    assert entry["level"] == "info" and entry["logger"] == "chat.server"
    assert (entry["event"], entry["message"], entry["code"]) == ("closed", "closed s7: 1000", 1000)


def test_a_line_without_an_event_or_unknown_fields_still_has_the_shape(configure) -> None:
    captured = configure(log_format="json", log_level="debug")
    logging.getLogger("chat.other").debug("plain %s", "words", extra={"sub": None})
    [entry] = captured.json()
    assert list(entry) == ["ts", "level", "logger", "event", "message"]
    assert (entry["level"], entry["event"], entry["message"]) == ("debug", "log", "plain words")


def test_an_exception_is_a_field_of_its_line(configure) -> None:
    captured = configure(log_format="json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it broke", extra={"event": "internal_error"})
    [entry] = captured.json()
    assert entry["message"] == "it broke"
    assert "Traceback" in str(entry["exception"]) and "RuntimeError: boom" in str(
        entry["exception"]
    )


def test_the_timestamp_is_utc_to_the_millisecond() -> None:
    assert logs.timestamp(1_800_000_000.0125) == "2027-01-15T08:00:00.012Z"


def test_text_lines_stay_the_message(configure) -> None:
    captured = configure()
    log.warning("policy reloaded from %s", "acl.toml", extra={"event": "policy_reloaded"})
    assert captured.text().endswith(" WARNING chat.server: policy reloaded from acl.toml\n")


def test_the_level_filters(configure) -> None:
    captured = configure(log_level="warning", log_format="json")
    log.info("not shown")
    log.warning("shown")
    assert [entry["message"] for entry in captured.json()] == ["shown"]


# ---------------------------------------------------------------- --log-format


def test_log_format_is_an_option_with_text_by_default() -> None:
    assert config_from(ServerConfig, build_parser().parse_args([])).log_format == "text"
    parsed = build_parser().parse_args(["--log-format", "json"])
    assert config_from(ServerConfig, parsed).log_format == "json"
    serve = build_parser().parse_args(["serve", "--log-format", "json"])
    assert config_from(ServerConfig, serve).log_format == "json"


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(UsageError, match="--log-format: invalid choice: 'xml'"):
        build_parser().parse_args(["--log-format", "xml"])
    with pytest.raises(ConfigError, match="log format must be one of text, json"):
        ServerConfig(log_format="xml")


# ---------------------------------------------------------------- redaction


@dataclass(frozen=True)
class Secret:
    kind: str
    value: str


def private_key(encoding: serialization.PrivateFormat, encrypted: bool = False) -> str:
    algorithm: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(PASSPHRASE.encode())
        if encrypted
        else serialization.NoEncryption()
    )
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, encoding, algorithm).decode()


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> list[Secret]:
    """One of each kind, made the way the server makes them (the refresh token by the store)."""
    store = StateStore.open(tmp_path_factory.mktemp("state") / "state.db")
    try:
        refresh = store.issue_refresh("alice", "x5t", 1_800_000_000.0, 3600.0)
    finally:
        store.close()
    access = jwt.encode({"sub": "alice", "aud": "chat"}, "k" * 32, algorithm="HS256")
    return [
        Secret("access token", access),
        Secret("refresh token", refresh),
        Secret("private key", private_key(serialization.PrivateFormat.PKCS8)),
        Secret("private key", private_key(serialization.PrivateFormat.TraditionalOpenSSL)),
        Secret("private key", private_key(serialization.PrivateFormat.PKCS8, encrypted=True)),
        Secret("passphrase", PASSPHRASE),
    ]


def log_everywhere(secret: str) -> None:
    """`secret` in a message, its arguments (as text and as bytes), an extra field (alone and
    in a container) and an exception's text and traceback."""
    log.info(f"in the message: {secret}")
    log.info("in the arguments: %s %r", secret, secret.encode())
    log.info("in an extra", extra={"event": "x", "token": secret, "list": [secret, {1: secret}]})
    try:
        raise ValueError(f"bad value {secret}")
    except ValueError:
        log.exception("in an exception")
    log.info("in a stack: %s", secret, stack_info=True)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_a_line(configure, secrets: list[Secret], log_format: str) -> None:
    captured = configure(log_format=log_format, key_passphrase=PASSPHRASE.encode())
    for secret in secrets:
        log_everywhere(secret.value)
    out = captured.text()
    for secret in secrets:
        # a PEM block line by line: its armour lines are not secret, its base64 lines are
        for line in secret.value.splitlines():
            if "-----" not in line:
                assert line not in out, secret.kind
        assert f"[redacted {secret.kind}]" in out
    if log_format == "json":
        assert len(captured.json()) == 5 * len(secrets)


def test_a_passphrase_is_redacted_only_when_configured(configure) -> None:
    captured = configure(log_format="json")
    log.info("the word %s", PASSPHRASE)
    assert captured.json()[0]["message"] == f"the word {PASSPHRASE}"


def test_ordinary_words_are_kept(configure) -> None:
    captured = configure(log_format="json", key_passphrase=PASSPHRASE.encode())
    words = "refused 127.0.0.1:5555: unknown CA; s12 (alice) closed 1008 token revoked"
    log.info(words, extra={"path": str(Path("state/acl.toml"))})
    [entry] = captured.json()
    assert (entry["message"], entry["path"]) == (words, "state/acl.toml")


def test_a_log_call_with_bad_arguments_is_still_redacted(secrets: list[Secret]) -> None:
    record = logging.makeLogRecord({"msg": "two %s %s", "args": (secrets[0].value,)})
    assert logs.Redactor().filter(record)
    assert record.getMessage() == "two %s %s ('[redacted access token]',)"


# ---------------------------------------------------------------- real events


async def test_connected_and_closed_carry_who_and_why(
    configure, start_below_tls, autojump_clock
) -> None:
    captured = configure(log_format="json")
    below: BelowTls = await start_below_tls()
    async with below.client("alice") as alice:
        session = alice.session
    [connected] = captured.events("connected")
    assert (connected["sub"], connected["conn"]) == ("alice", session)
    assert connected["subprotocol"] == "v12.stomp"
    [closed] = captured.events("closed")
    assert (closed["sub"], closed["conn"], closed["code"]) == ("alice", session, 1000)
    assert "reason" in closed
    assert "bearer." not in captured.text() and "eyJ" not in captured.text()


async def test_a_refused_upgrade_says_its_code(configure, start_below_tls, autojump_clock) -> None:
    captured = configure(log_format="json")
    below: BelowTls = await start_below_tls()
    with pytest.raises(TokenRefused):
        async with below.client("alice", token="not-a-token"):
            pass
    [refused] = captured.events("upgrade_refused")
    assert (refused["sub"], refused["code"], refused["status"]) == ("alice", "invalid_token", 401)
    assert "peer" not in refused  # below TLS there is no address


async def test_over_tls_the_lines_say_where_the_peer_is(
    configure, start_server, pki: TestPki
) -> None:
    captured = configure(log_format="json")
    server: RunningServer = await start_server()
    async with raw_ws(server, pki, "alice"):
        pass
    await refused_handshake(server, pki.foreign_context())
    await server.stop()
    [connected], [closed] = captured.events("connected"), captured.events("closed")
    assert connected["peer"] == closed["peer"]
    assert str(connected["peer"]).startswith("127.0.0.1:")
    assert (closed["sub"], closed["conn"]) == ("alice", connected["conn"])
    [refused] = captured.events("handshake_refused")
    assert str(refused["peer"]).startswith("127.0.0.1:") and refused["reason"] == "unknown CA"


async def test_a_revocation_is_seen_and_ends_the_connection(
    configure, start_below_tls, autojump_clock
) -> None:
    captured = configure(log_format="json")
    below: BelowTls = await start_below_tls()
    async with below.stomp_peer("alice") as alice:
        below.server.state.revoke_sub("alice", below.server.clock())  # as `chat-server revoke`
        with pytest.raises(ConnectionClosed):
            while True:
                await alice.ws.get_message()
    while not captured.events("closed"):  # written once the server's close handshake is over
        await trio.sleep(0.01)  # mock time (autojump_clock)
    [seen] = captured.events("revocations_changed")
    assert seen["connections"] == 1
    [closed] = captured.events("closed")
    assert (closed["sub"], closed["code"], closed["reason"]) == ("alice", 1008, "token revoked")
