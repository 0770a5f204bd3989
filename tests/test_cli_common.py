"""The CLI scaffold every `chat-*` command stands on: one-line errors, exit codes, passphrases,
options made from a config dataclass."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from chat import certs_cli
from chat.cli_common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    UsageError,
    add_config_options,
    add_passphrase_option,
    config_from,
    option,
    run_main,
)
from chat.load import cli as load_cli
from chat.server import cli as server_cli


class Refused(Exception):
    """An error a command expects and reports."""


def one_line(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    """The single stderr line of a failed run (nothing on stdout), without its prefix."""
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"{prog}: ")
    return lines[0].removeprefix(f"{prog}: ")


# ---------------------------------------------------------------- Parser


def test_a_parser_error_is_a_usage_error_naming_help() -> None:
    parser = Parser(prog="tool")
    parser.add_argument("--count", type=int)
    with pytest.raises(UsageError) as info:
        parser.parse_args(["--count", "many"])
    assert str(info.value) == "argument --count: invalid int value: 'many' (see 'tool --help')"


def test_a_subcommand_error_names_the_subcommand_help() -> None:
    parser = Parser(prog="tool")
    sub = parser.add_subparsers(required=True, metavar="COMMAND").add_parser("go")
    sub.add_argument("--to", required=True)
    with pytest.raises(UsageError) as info:
        parser.parse_args(["go"])
    assert str(info.value) == ("the following arguments are required: --to (see 'tool go --help')")


# ---------------------------------------------------------------- run_main


def test_run_main_returns_the_status_of_the_body(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("tool", lambda: EXIT_OK) == 0
    assert run_main("tool", lambda: 7) == 7
    assert capsys.readouterr() == ("", "")


def fail(error: BaseException) -> Callable[[], int]:
    def body() -> int:
        raise error

    return body


def bad_option() -> int:
    Parser(prog="tool").parse_args(["--bogus"])
    return EXIT_OK


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (fail(UsageError("--size must be 1..9")), "--size must be 1..9"),
        (fail(Refused("server unreachable")), "server unreachable"),
        (bad_option, "unrecognized arguments: --bogus (see 'tool --help')"),
    ],
)
def test_usage_and_reported_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], body: Callable[[], int], line: str
) -> None:
    assert run_main("tool", body, (Refused,)) == EXIT_ERROR == 2
    assert one_line(capsys, "tool") == line


def test_explain_adds_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    def explain(exc: Exception) -> str:
        return f"{exc}; try again later"

    assert run_main("tool", fail(Refused("busy")), (Refused,), explain=explain) == 2
    assert one_line(capsys, "tool") == "busy; try again later"


def test_an_error_nobody_expects_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        run_main("tool", lambda: 1 // 0, (Refused,))


def test_ctrl_c_is_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("tool", fail(KeyboardInterrupt())) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr() == ("", "")


def test_help_exits_0_through_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_main("tool", _help)
    assert info.value.code == 0
    assert "usage: tool" in capsys.readouterr().out


def _help() -> int:
    Parser(prog="tool").parse_args(["--help"])
    return EXIT_OK


# ---------------------------------------------------------------- passphrases


def passphrase_parser() -> Parser:
    parser = Parser(prog="tool")
    add_passphrase_option(parser, "the key's passphrase is in environment variable VAR")
    add_passphrase_option(parser, "the CA key's", flag="--ca-passphrase-env")
    return parser


def test_the_passphrase_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_PW", "s3cret")
    monkeypatch.setenv("CA_PW", "ca s3cret")
    args = passphrase_parser().parse_args(
        ["--passphrase-env", "KEY_PW", "--ca-passphrase-env", "CA_PW"]
    )
    assert (args.passphrase, args.ca_passphrase) == (b"s3cret", b"ca s3cret")
    args = passphrase_parser().parse_args([])
    assert (args.passphrase, args.ca_passphrase) == (None, None)


@pytest.mark.parametrize(
    ("value", "said"), [(None, "is not set"), ("", "is empty")], ids=["unset", "empty"]
)
def test_the_variable_must_be_set_and_not_empty(
    monkeypatch: pytest.MonkeyPatch, value: str | None, said: str
) -> None:
    if value is None:
        monkeypatch.delenv("KEY_PW", raising=False)
    else:
        monkeypatch.setenv("KEY_PW", value)
    with pytest.raises(UsageError) as info:
        passphrase_parser().parse_args(["--passphrase-env", "KEY_PW"])
    assert str(info.value) == (
        f"argument --passphrase-env: environment variable KEY_PW {said} (see 'tool --help')"
    )


Main = Callable[[Sequence[str] | None], int]
TOOLS: list[tuple[str, Main, list[str]]] = [
    ("chat-certs", certs_cli.main, ["init"]),
    ("chat-server", server_cli.main, []),
    ("chat-server", server_cli.main, ["serve"]),
]


@pytest.mark.parametrize(("prog", "main", "command"), TOOLS)
@pytest.mark.parametrize(("value", "said"), [(None, "is not set"), ("", "is empty")])
def test_every_tool_says_the_same_of_a_bad_passphrase_variable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    prog: str,
    main: Main,
    command: list[str],
    value: str | None,
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written
    if value is None:
        monkeypatch.delenv("CHAT_TEST_PW", raising=False)
    else:
        monkeypatch.setenv("CHAT_TEST_PW", value)
    assert main([*command, "--passphrase-env", "CHAT_TEST_PW"]) == EXIT_ERROR
    line = one_line(capsys, prog)
    assert line.startswith(
        f"argument --passphrase-env: environment variable CHAT_TEST_PW {said} (see '{prog}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("prog", "main", "command"),
    [*TOOLS, ("chat-server", server_cli.main, ["keys", "list"]), ("chat-load", load_cli.main, [])],
)
def test_every_tool_reports_a_bad_option_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    prog: str,
    main: Main,
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--bogus"]) == EXIT_ERROR
    line = one_line(capsys, prog)
    assert "--bogus" in line and line.endswith(f"(see '{prog} --help')")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- options from a dataclass


def _pair(host: str, port: str) -> tuple[str, int]:
    return host, int(port)


def _even(word: str) -> int:
    if int(word) % 2:
        raise ValueError(f"{word} is odd")
    return int(word)


def _span(word: str) -> tuple[int, int]:
    start, end = (int(part) for part in word.split(","))
    return start, end


@dataclass(frozen=True, slots=True)
class Demo:
    name: str = option("demo", "its name", group="basics")
    lifetime: float = option(300.0, "how long", group="basics", metavar="SECONDS")
    home: Path | None = option(None, "where it lives", group="files", shown="HERE/home")
    even: int = option(2, "an even number", group="basics", parse=_even)
    peers: tuple[tuple[str, int], ...] = option(
        (),
        "a peer (repeatable)",
        group="files",
        metavar=("HOST", "PORT"),
        parse=_pair,
        repeat=True,
    )
    secret: bytes | None = option(
        None, "its secret", group="files", flag="--secret-env", secret_env=True, repr=False
    )
    mode: str = option("fast", "how", group="basics", choices=("fast", "slow"))
    window: tuple[int, int] = option((10, 20), "from,to", group="basics", parse=_span)
    hidden: int = 5  # no option(): not on the command line


def demo_parser(*, defaults: bool = True) -> Parser:
    parser = Parser(prog="demo")
    add_config_options(parser, Demo, defaults=defaults)
    return parser


def test_options_are_made_from_the_fields_with_their_defaults() -> None:
    assert config_from(Demo, demo_parser().parse_args([])) == Demo()
    args = demo_parser().parse_args(
        [
            "--name",
            "x",
            "--lifetime",
            "1.5",
            "--home",
            "/h",
            "--even",
            "4",
            "--peers",
            "a",
            "1",
            "--peers",
            "b",
            "2",
            "--mode",
            "slow",
        ]
    )
    assert config_from(Demo, args) == Demo(
        name="x", lifetime=1.5, home=Path("/h"), even=4, peers=(("a", 1), ("b", 2)), mode="slow"
    )


def test_a_secret_option_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_SECRET", "hush")
    args = demo_parser().parse_args(["--secret-env", "DEMO_SECRET"])
    assert config_from(Demo, args).secret == b"hush"
    assert "hush" not in repr(config_from(Demo, args))


def test_help_shows_each_default_as_typed() -> None:
    text = " ".join(demo_parser().format_help().split())
    for shown in (
        "--name NAME its name (default demo)",
        "--lifetime SECONDS how long (default 300)",
        "--home HOME where it lives (default HERE/home)",
        "--peers HOST PORT a peer (repeatable)",
        "--secret-env VAR its secret",
        "(default 10,20)",
        "basics:",
        "files:",
    ):
        assert shown in text
    assert "--hidden" not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lifetime", "soon"], "argument --lifetime: invalid float value: 'soon'"),
        (["--even", "3"], "argument --even: 3 is odd"),
        (["--peers", "a", "b"], "argument --peers: invalid literal for int() with base 10: 'b'"),
        (["--peers", "a"], "argument --peers: expected 2 arguments"),
        (["--mode", "slowest"], "argument --mode: invalid choice: 'slowest'"),
    ],
)
def test_a_bad_value_is_that_options_one_line_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        demo_parser().parse_args(argv)
    assert str(info.value).startswith(message)
    assert str(info.value).endswith("(see 'demo --help')")


def test_without_defaults_only_what_is_given_is_set() -> None:
    args = demo_parser(defaults=False).parse_args(["--lifetime", "2", "--peers", "a", "1"])
    assert vars(args) == {"lifetime": 2.0, "peers": (("a", 1),)}


def test_a_field_no_plain_type_parses_needs_parse() -> None:
    @dataclass(frozen=True)
    class Odd:
        pair: tuple[int, int] = option((1, 2), "a pair", group="g")

    with pytest.raises(TypeError, match="needs option"):
        add_config_options(argparse.ArgumentParser(), Odd)
