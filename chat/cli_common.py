"""What every `chat-*` command shares: one-line errors, exit codes, passphrases, config flags.

The contract of each command: results on stdout; an error is one line on stderr,
`PROG: message`, with exit status 2 and never a traceback; Ctrl-C is 130. `run_main` keeps
it, `Parser` turns argparse's own errors into such lines (`... (see 'PROG --help')`).
`add_passphrase_option` reads a key's passphrase from the environment variable the user
names (never from the command line, where `ps` shows it). `option()` puts a command-line
flag on a config dataclass's field (help, flag name, parser), and `add_config_options` /
`config_from` derive the argparse options and the config from those fields: the dataclass
stays the one place for defaults, and `--help` shows them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

EXIT_OK = 0
EXIT_ERROR = 2  # every failure, as argparse uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
PASSPHRASE_FLAG = "--passphrase-env"

T = TypeVar("T")
C = TypeVar("C")
Reported = tuple[type[Exception], ...]


class UsageError(Exception):
    """A command line that cannot be carried out as given: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise `UsageError` (one line) instead of printing the usage and
    exiting; subcommand parsers made with `add_subparsers` are Parsers too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def run_main(
    prog: str,
    body: Callable[[], int],
    reported: Reported = (),
    *,
    explain: Callable[[Exception], str] = str,
) -> int:
    """Run a command's `body` and return its exit status.

    A `UsageError` or one of the `reported` error types (the failures the command expects:
    each already says what went wrong) becomes one line `PROG: message` on stderr (`explain`
    may add what to do about it) and EXIT_ERROR; Ctrl-C is EXIT_INTERRUPTED. Anything else
    is a bug and keeps its traceback; `--help` exits through argparse's SystemExit.
    """
    caught: Reported = (UsageError, *reported)
    try:
        return body()
    except caught as exc:
        print(f"{prog}: {explain(exc)}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------- passphrases


def passphrase_from_env(variable: str) -> bytes:
    """The passphrase in environment variable `variable`, which must be set and not empty.

    An argparse `type`: a missing or empty variable is that option's one-line usage error.
    """
    value = os.environ.get(variable)
    if value is None:
        raise argparse.ArgumentTypeError(f"environment variable {variable} is not set")
    if not value:
        raise argparse.ArgumentTypeError(f"environment variable {variable} is empty")
    return value.encode()


def add_passphrase_option(
    parser: argparse._ActionsContainer, help: str, flag: str = PASSPHRASE_FLAG
) -> None:
    """`flag VAR`: the parsed value is VAR's content as bytes (None without the flag), in
    `args.passphrase` for `--passphrase-env`, `args.ca_passphrase` for `--ca-passphrase-env`."""
    dest = flag.removeprefix("--").removesuffix("-env").replace("-", "_")
    parser.add_argument(flag, type=passphrase_from_env, metavar="VAR", dest=dest, help=help)


# ---------------------------------------------------------------- options from a config dataclass

_FLAG = "chat.cli_common.Flag"  # the key of a field's metadata that holds its Flag
_PLAIN_TYPES: tuple[type, ...] = (str, int, float, Path)  # argparse parses these by calling them


@dataclasses.dataclass(frozen=True, slots=True)
class Flag:
    """How one config field appears on the command line (see `option`)."""

    help: str
    group: str
    name: str  # "--max-frame-bytes"; "" = the field's name with dashes
    metavar: str | tuple[str, ...] | None
    parse: Callable[..., object] | None  # the words to the value; None = the field's type
    choices: tuple[str, ...]
    shown: str  # the default as --help says it; "" = the default itself (nothing for None, ())
    secret_env: bool  # the word names an environment variable holding a passphrase
    repeat: bool  # may be given many times; the field is the tuple of the values


def option(
    default: T,
    help: str,
    *,
    group: str,
    flag: str = "",
    metavar: str | tuple[str, ...] | None = None,
    parse: Callable[..., object] | None = None,
    choices: tuple[str, ...] = (),
    shown: str = "",
    secret_env: bool = False,
    repeat: bool = False,
    repr: bool = True,
) -> T:
    """A dataclass field with `default` that is also a command-line option.

    `parse` turns the option's words (as many as `metavar` names) into the value; a
    ValueError it raises is the option's one-line error. Without it the field's type
    (str, int, float, Path, or one of them | None) parses the word. With `secret_env` the
    word names an environment variable and the field gets its content (a passphrase); with
    `repeat` the option may come many times and the field is the tuple of the values.
    `shown` is how --help names a default that is not a value ("CERTS_DIR/server.crt").
    """
    spec = Flag(help, group, flag, metavar, parse, choices, shown, secret_env, repeat)
    return dataclasses.field(default=default, repr=repr, metadata={_FLAG: spec})


def add_config_options(
    parser: argparse.ArgumentParser, config: type[Any], *, defaults: bool = True
) -> None:
    """An option for each `option()` field of dataclass `config`, in argument groups named
    by `group`, in field order. With `defaults=False` an option left out sets nothing (for a
    subcommand whose values, when not given, are those its parent parser already set)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in _flagged(config):
        spec = _flag_of(config, name)
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        add_config_option(groups[spec.group], config, name, defaults=defaults)


def add_config_option(
    parser: argparse._ActionsContainer,
    config: type[Any],
    name: str,
    *,
    help: str = "",
    defaults: bool = True,
) -> None:
    """The option of field `name` of `config` alone (another `help` for another command)."""
    spec = _flag_of(config, name)
    default = _field(config, name).default
    parser.add_argument(
        spec.name or "--" + name.replace("_", "-"),
        dest=name,
        default=default if defaults else argparse.SUPPRESS,
        help=_help(help or spec.help, spec.shown or _shown(default)),
        **_how_to_parse(spec, typing.get_type_hints(config)[name]),
    )


def config_from(config: type[C], args: argparse.Namespace) -> C:
    """`config` made from the values of its `option()` fields in parsed `args`."""
    return config(**{name: getattr(args, name) for name in _flagged(config)})


def _flagged(config: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if _FLAG in f.metadata]


def _field(config: type[Any], name: str) -> dataclasses.Field[Any]:
    (found,) = (f for f in dataclasses.fields(config) if f.name == name)
    return found


def _flag_of(config: type[Any], name: str) -> Flag:
    spec: Flag = _field(config, name).metadata[_FLAG]
    return spec


def _how_to_parse(spec: Flag, hint: object) -> dict[str, Any]:
    """argparse's keywords that turn the option's words into the field's value."""
    if spec.secret_env:
        return {"type": passphrase_from_env, "metavar": spec.metavar or "VAR"}
    words = len(spec.metavar) if isinstance(spec.metavar, tuple) else 1
    if spec.repeat or words > 1:
        parse = spec.parse or _plain_type(hint)
        return {
            "action": _Words,
            "parse": parse,
            "repeat": spec.repeat,
            "nargs": words if words > 1 else None,
            "metavar": spec.metavar,
        }
    return {
        "type": _readable(spec.parse) if spec.parse else _plain_type(hint),
        "metavar": spec.metavar,
        "choices": spec.choices or None,
    }


def _plain_type(hint: object) -> type:
    """str, int, float or Path from a field's type (`Path | None` is Path)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    plain = [t for t in options if t is not type(None)]
    if len(plain) != 1 or plain[0] not in _PLAIN_TYPES:
        raise TypeError(f"a field of type {hint} needs option(parse=...)")
    found: type = plain[0]
    return found


def _readable(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse` whose ValueError message becomes the option's error (not 'invalid value')."""

    def convert(word: str) -> object:
        try:
            return parse(word)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


class _Words(argparse.Action):
    """An option of several words (`--trust-jwks FILE ISS`) whose value is `parse(*words)`;
    with `repeat`, each use adds one value to a tuple."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        parse: Callable[..., object],
        repeat: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.parse = parse
        self.repeat = repeat

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        words = [values] if isinstance(values, str) else list(values or ())
        try:
            value = self.parse(*words)
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        if self.repeat:
            value = (*getattr(namespace, self.dest, ()), value)
        setattr(namespace, self.dest, value)


def _help(text: str, default: str) -> str:
    help_text = f"{text} (default {default})" if default else text
    return help_text.replace("%", "%%")  # argparse %-formats help strings


def _shown(value: object) -> str:
    """A default as the command line would spell it: 300 not 300.0, 10000,10000."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(_shown(item) for item in value)
    return "" if value is None else str(value)
