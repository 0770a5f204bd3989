"""`chat-certs` run in-process: files written, refusals, one-line errors with exit 2."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from chat import pki
from chat.certs_cli import main
from chat.pki import DevPki, KeyPassphraseRequired


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return tmp_path / "certs"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run chat-certs; return the exit status and stdout, after checking the stderr contract."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    if code == 0:
        assert err == ""
    return code, out


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run chat-certs expecting exit 2 and exactly one 'chat-certs: ' line on stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("chat-certs: ")
    return lines[0]


def init(capsys: pytest.CaptureFixture[str], certs: Path, *extra: str) -> str:
    code, out = run(capsys, "init", "--dir", str(certs), *extra)
    assert code == 0
    return out


def test_init_writes_ca_server_and_crl(capsys: pytest.CaptureFixture[str], certs: Path) -> None:
    out = init(capsys, certs, "--san", "chat.example", "--san", "10.0.0.7")
    layout = DevPki.at(certs)
    for path in (layout.ca, layout.ca_key, layout.server_cert, layout.server_key, layout.crl):
        assert f"wrote {path}" in out
    assert stat.S_IMODE(layout.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.server_key.stat().st_mode) == 0o600
    assert f"next: chat-certs client alice --dir {certs}" in out
    assert "chat.example" in out and "10.0.0.7" in out
    pki.server_ssl_context(layout.server_cert, layout.server_key, layout.ca, layout.crl)


def test_init_refuses_to_overwrite(capsys: pytest.CaptureFixture[str], certs: Path) -> None:
    init(capsys, certs)
    before = (certs / "ca.crt").read_bytes()
    line = fails(capsys, "init", "--dir", str(certs))
    assert str(certs / "ca.crt") in line and "--force" in line
    assert (certs / "ca.crt").read_bytes() == before


def test_init_force_replaces(capsys: pytest.CaptureFixture[str], certs: Path) -> None:
    init(capsys, certs)
    before = (certs / "ca.crt").read_bytes()
    init(capsys, certs, "--force")
    assert (certs / "ca.crt").read_bytes() != before


def test_init_force_with_a_bad_san_keeps_the_old_files(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    init(capsys, certs)
    before = (certs / "ca.key").read_bytes()
    line = fails(capsys, "init", "--dir", str(certs), "--force", "--san", "bad name")
    assert "not a host name" in line
    assert (certs / "ca.key").read_bytes() == before


def test_client_writes_pair_signed_by_the_ca(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    init(capsys, certs)
    code, out = run(capsys, "client", "alice", "--dir", str(certs), "--days", "90")
    assert code == 0
    layout = DevPki.at(certs)
    crt, key = layout.client("alice")
    assert f"wrote {crt}" in out and f"wrote {key}" in out and "next:" in out
    cert = pki.load_certificate(crt)
    assert pki.identity_of(cert) == "alice"
    cert.verify_directly_issued_by(pki.load_certificate(layout.ca))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pki.thumbprint(cert.public_bytes(Encoding.DER)) in out


def test_client_refuses_to_overwrite_unless_forced(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    init(capsys, certs)
    run(capsys, "client", "alice", "--dir", str(certs))
    before = (certs / "alice.crt").read_bytes()
    line = fails(capsys, "client", "alice", "--dir", str(certs))
    assert "alice.crt already exists" in line
    assert (certs / "alice.crt").read_bytes() == before
    assert run(capsys, "client", "alice", "--dir", str(certs), "--force")[0] == 0
    assert (certs / "alice.crt").read_bytes() != before


@pytest.mark.parametrize(
    ("name", "fragment"), [("a/b", "client name"), ("ca", "reserved"), ("server", "reserved")]
)
def test_client_refuses_bad_names(
    capsys: pytest.CaptureFixture[str], certs: Path, name: str, fragment: str
) -> None:
    init(capsys, certs)
    assert fragment in fails(capsys, "client", name, "--dir", str(certs))


def test_client_without_ca_names_the_missing_file(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    line = fails(capsys, "client", "alice", "--dir", str(certs))
    assert f"{certs / 'ca.crt'}: no such file" in line


def test_revoke_adds_the_serial_to_the_crl(capsys: pytest.CaptureFixture[str], certs: Path) -> None:
    init(capsys, certs)
    run(capsys, "client", "alice", "--dir", str(certs))
    code, out = run(capsys, "revoke", "alice", "--dir", str(certs))
    assert code == 0
    serial = pki.load_certificate(certs / "alice.crt").serial_number
    assert f"{serial:#x}" in out and str(certs / "crl.pem") in out
    crl = pki.load_crl(certs / "crl.pem", pki.load_certificate(certs / "ca.crt"))
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


def test_revoke_unknown_name(capsys: pytest.CaptureFixture[str], certs: Path) -> None:
    init(capsys, certs)
    assert "zed.crt: no such file" in fails(capsys, "revoke", "zed", "--dir", str(certs))


def test_rotate_server_keeps_the_names_and_replaces_the_pair(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    init(capsys, certs, "--san", "chat.example", "--san", "10.0.0.7")
    layout = DevPki.at(certs)
    old = pki.load_certificate(layout.server_cert)
    code, out = run(capsys, "rotate-server", "--dir", str(certs))
    assert code == 0
    assert f"wrote {layout.server_cert}" in out and f"wrote {layout.server_key}" in out
    new = pki.load_certificate(layout.server_cert)
    assert new.serial_number != old.serial_number
    assert pki.san_strings(new) == pki.san_strings(old)
    assert pki.identity_of(new) == "chat.example"
    new.verify_directly_issued_by(pki.load_certificate(layout.ca))
    assert stat.S_IMODE(layout.server_key.stat().st_mode) == 0o600
    pki.server_ssl_context(layout.server_cert, layout.server_key, layout.ca, layout.crl)
    assert [p.name for p in certs.iterdir() if p.name.endswith(".tmp")] == []


def test_rotate_server_with_sans_names_only_those(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    init(capsys, certs, "--san", "chat.example")
    assert run(capsys, "rotate-server", "--dir", str(certs), "--san", "new.example")[0] == 0
    new = pki.load_certificate(certs / "server.crt")
    assert pki.san_strings(new) == ["localhost", "127.0.0.1", "::1", "new.example"]


def test_rotate_server_keeps_an_encrypted_key_encrypted(
    capsys: pytest.CaptureFixture[str], certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", "server secret")
    init(capsys, certs, "--passphrase-env", "PW")
    before = (certs / "server.crt").read_bytes()
    line = fails(capsys, "rotate-server", "--dir", str(certs), "--ca-passphrase-env", "PW")
    assert "server.key" in line and "--passphrase-env VAR" in line
    assert (certs / "server.crt").read_bytes() == before
    argv = ["rotate-server", "--dir", str(certs), "--ca-passphrase-env", "PW"]
    code, out = run(capsys, *argv, "--passphrase-env", "PW")
    assert code == 0 and "encrypted" in out
    pki.server_ssl_context(
        certs / "server.crt", certs / "server.key", certs / "ca.crt", None, b"server secret"
    )


def test_rotate_server_needs_a_server_certificate(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    init(capsys, certs)
    (certs / "server.crt").unlink()
    assert "server.crt: no such file" in fails(capsys, "rotate-server", "--dir", str(certs))


def warned(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """Run chat-certs expecting success; its stderr lines, each a warning."""
    assert main(list(argv)) == 0
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("chat-certs: warning: ") for line in lines), lines
    return lines


def test_a_certificate_ending_within_30_days_is_warned_about(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    init(capsys, certs)
    alice = certs / "alice.crt"
    [line] = warned(capsys, "client", "alice", "--dir", str(certs), "--days", "10")
    assert f"{alice} expires on " in line and "in 9 days" in line
    assert warned(capsys, "show", str(alice)) == [line]
    assert warned(capsys, "client", "bob", "--dir", str(certs), "--days", "31") == []
    assert warned(capsys, "rotate-server", "--dir", str(certs), "--days", "5") == [
        f"chat-certs: warning: {certs / 'server.crt'} expires on "
        f"{pki.load_certificate(certs / 'server.crt').not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
        "in 4 days"
    ]


def test_a_ca_ending_soon_is_warned_about_with_what_it_signs(
    capsys: pytest.CaptureFixture[str], certs: Path
) -> None:
    layout = DevPki.at(certs)
    certs.mkdir()
    ca_key, ca_cert = pki.make_ca(days=20)
    pki.write_private_key(layout.ca_key, ca_key)
    pki.write_certificate(layout.ca, ca_cert)
    lines = warned(capsys, "client", "alice", "--dir", str(certs))
    assert [line.split(" expires on ")[0] for line in lines] == [
        f"chat-certs: warning: {layout.ca}",
        f"chat-certs: warning: {certs / 'alice.crt'}",  # it cannot outlive the CA
    ]


def test_show_prints_the_certificate_facts(capsys: pytest.CaptureFixture[str], certs: Path) -> None:
    init(capsys, certs, "--san", "chat.example")
    cert = pki.load_certificate(certs / "server.crt")
    code, out = run(capsys, "show", str(certs / "server.crt"))
    assert code == 0
    assert "subject CN: chat.example" in out
    assert "issuer:     CN=Chat Dev CA" in out
    assert f"serial:     {cert.serial_number:#x}" in out
    assert f"not after:  {cert.not_valid_after_utc.isoformat()}" in out
    assert "SANs:       localhost, 127.0.0.1, ::1, chat.example" in out
    assert f"x5t#S256:   {pki.thumbprint(cert.public_bytes(Encoding.DER))}" in out


def test_show_refuses_a_non_certificate(capsys: pytest.CaptureFixture[str], certs: Path) -> None:
    init(capsys, certs)
    assert "is not a certificate" in fails(capsys, "show", str(certs / "ca.key"))


def test_passphrase_env_round_trip(
    capsys: pytest.CaptureFixture[str], certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CA_PW", "ca secret")
    monkeypatch.setenv("ALICE_PW", "alice secret")
    out = init(capsys, certs, "--passphrase-env", "CA_PW")
    assert "encrypted" in out
    with pytest.raises(KeyPassphraseRequired):
        pki.load_private_key(certs / "ca.key")
    line = fails(capsys, "client", "alice", "--dir", str(certs))
    assert "--ca-passphrase-env VAR" in line and "ca.key" in line
    argv = ["client", "alice", "--dir", str(certs), "--ca-passphrase-env", "CA_PW"]
    assert run(capsys, *argv, "--passphrase-env", "ALICE_PW")[0] == 0
    pki.load_private_key(certs / "alice.key", b"alice secret")
    pki.server_ssl_context(
        certs / "server.crt",
        certs / "server.key",
        certs / "ca.crt",
        certs / "crl.pem",
        b"ca secret",
    )
    assert "ca.key" in fails(capsys, "revoke", "alice", "--dir", str(certs))
    assert (
        run(capsys, "revoke", "alice", "--dir", str(certs), "--ca-passphrase-env", "CA_PW")[0] == 0
    )


def test_wrong_ca_passphrase(
    capsys: pytest.CaptureFixture[str], certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CA_PW", "ca secret")
    monkeypatch.setenv("OTHER", "something else")
    init(capsys, certs, "--passphrase-env", "CA_PW")
    line = fails(capsys, "client", "alice", "--dir", str(certs), "--ca-passphrase-env", "OTHER")
    assert "wrong passphrase" in line


def test_missing_or_empty_passphrase_variable(
    capsys: pytest.CaptureFixture[str], certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    monkeypatch.setenv("EMPTY_VAR", "")
    line = fails(capsys, "init", "--dir", str(certs), "--passphrase-env", "NO_SUCH_VAR")
    assert "NO_SUCH_VAR is not set" in line
    line = fails(capsys, "init", "--dir", str(certs), "--passphrase-env", "EMPTY_VAR")
    assert "EMPTY_VAR is empty" in line
    assert not certs.exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ((), "required: COMMAND"),
        (("bogus",), "invalid choice"),
        (("client",), "required: NAME"),
        (("init", "--days", "soon"), "invalid int value"),
        (("init", "--days", "0"), "at least 1 day"),
    ],
)
def test_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    fragment: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # the default ./certs, were anything written
    assert fragment in fails(capsys, *argv)
    assert list(tmp_path.iterdir()) == []


def test_help_explains_files_and_modes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "init",
        "client",
        "revoke",
        "rotate-server",
        "show",
        "ca.key",
        "crl.pem",
        "0600",
        "--passphrase-env",
    ):
        assert word in out
