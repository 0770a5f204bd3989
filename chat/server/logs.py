"""The server's log lines: text for people or JSON for log shipping, and never a secret.

Log calls name what happened and its facts with `extra={"event": ..., "sub": ..., ...}`;
the text format shows only the message, the JSON format one object per line with them all.
`Redactor`, the filter on the one handler `configure` installs, rewrites each record before
any formatter sees it (message and arguments, extra fields, exception and stack text), so
no access token, refresh token, private key or the key's passphrase reaches a line.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

from chat.server.config import ServerConfig
from chat.store.state import REFRESH_TOKEN_BYTES

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_EVENT = "log"  # a line whose call names no event
# JSON keys in this order first; the event's own fields follow
IDENTITY_FIELDS = ("peer", "sub", "conn")
# What every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

_B64URL = "A-Za-z0-9_-"
_REFRESH_CHARS = math.ceil(REFRESH_TOKEN_BYTES * 4 / 3)  # secrets.token_urlsafe, unpadded
# (label, pattern) in the order they are tried at each position
_SECRETS = (
    # a JWT (or what is left of one cut short): its header is base64url JSON, so "eyJ"
    ("access token", rf"eyJ[{_B64URL}]*(?:\.[{_B64URL}]*){{1,2}}"),
    (
        "private key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)",
    ),
    ("refresh token", rf"(?<![{_B64URL}])[{_B64URL}]{{{_REFRESH_CHARS}}}(?![{_B64URL}])"),
)


class Redactor(logging.Filter):
    """Rewrites a record so that none of the secrets above, nor `passphrases`, remains."""

    def __init__(self, passphrases: Iterable[str] = ()) -> None:
        super().__init__()
        # longest first, so that one passphrase inside another is not half replaced
        phrases = sorted({phrase for phrase in passphrases if phrase}, key=len, reverse=True)
        secrets = [*_SECRETS, *(("passphrase", re.escape(phrase)) for phrase in phrases)]
        self._labels = {f"g{i}": label for i, (label, _) in enumerate(secrets)}
        alternatives = (f"(?P<g{i}>{pattern})" for i, (_, pattern) in enumerate(secrets))
        self._pattern = re.compile("|".join(alternatives), re.DOTALL)

    def redact(self, text: str) -> str:
        """`text` with each secret replaced by `[redacted <what>]`."""
        return self._pattern.sub(self._replacement, text)

    def _replacement(self, match: re.Match[str]) -> str:
        assert match.lastgroup is not None
        return f"[redacted {self._labels[match.lastgroup]}]"

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad log call still says what it was given, redacted
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), ()
        for name in vars(record).keys() - _RECORD_ATTRS:
            setattr(record, name, self._scrub(getattr(record, name)))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None  # only its redacted text may be shown
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True

    def _scrub(self, value: object) -> object:
        """An extra field's value, redacted, in JSON's types."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub(item) for item in value]
        if isinstance(value, dict):
            return {self.redact(str(key)): self._scrub(item) for key, item in value.items()}
        return self.redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event, message, peer/sub/conn when
    known, then the event's own fields (and the exception's text, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            name: value
            for name, value in vars(record).items()
            if name not in _RECORD_ATTRS and value is not None
        }
        entry: dict[str, object] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": fields.pop("event", DEFAULT_EVENT),
            "message": record.getMessage(),
        }
        entry |= {name: fields.pop(name) for name in IDENTITY_FIELDS if name in fields}
        entry |= {name: value for name, value in fields.items() if name not in entry}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def timestamp(created: float) -> str:
    """ISO 8601 in UTC to the millisecond, as log shippers parse it: 2026-12-01T18:50:43.123Z."""
    when = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return when.replace("+00:00", "Z")


def configure(config: ServerConfig) -> logging.Handler:
    """Log to stderr at `--log-level` in `--log-format`, through a Redactor that also knows
    the key's passphrase; the handler, which the root logger now has."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if config.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(Redactor(passphrase_forms(config.key_passphrase)))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    return handler


def passphrase_forms(passphrase: bytes | None) -> set[str]:
    """How a passphrase can appear in a line: as text, or escaped in a bytes or str repr."""
    if not passphrase:
        return set()
    text = passphrase.decode("utf-8", "backslashreplace")
    return {text, repr(passphrase)[2:-1], repr(text)[1:-1]}
