"""Issue 11, the token, state and operator part: every bad input answered with its code,
every resource bounded. HttpApi and StateStore as plain values (state in tmp_path, storage
calls on the event loop through `InlineLane`, time injected: no real sleeps); the CLI
in-process through `chat.server.cli.main`, a subprocess only where the process matters."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from chat import pki as pki_module
from chat.pki import KeyPassphraseRequired, PkiError, WrongPassphrase
from chat.protocol.policy import DEFAULT_POLICY, Policy
from chat.protocol.tokens import (
    Claims,
    InvalidRefresh,
    RefreshExpired,
    RefreshReused,
    TokenAuthority,
    TokenPolicy,
    TokenRevoked,
)
from chat.server.app import ChatServer
from chat.server.cli import main
from chat.server.config import ServerConfig
from chat.server.http_api import HttpApi, Peer, Request, Response, refusal_response
from chat.server.ratelimit import RateLimiter
from chat.server.upgrade import authorize
from chat.store.keys import KeyStore
from chat.store.state import MAX_SPENT_KEPT, StateStore
from tests.below_tls import InlineLane
from tests.conftest import (
    RunningServer,
    StompPeer,
    TestPki,
    http_request,
    raw_ws,
    stomp_peer,
    token_for,
)
from tests.test_server_routes import idle_admin, upgrade_request

SERVER = [sys.executable, "-m", "chat.server.cli"]

NOW = 1_800_000_000.0
LIFETIME = 60
ALICE = Peer("alice", "alice-x5t")
BOB = Peer("bob", "bob-x5t")


@dataclass
class Server:
    authority: TokenAuthority
    state: StateStore
    api: HttpApi
    now: float = NOW

    async def post(self, path: str, peer: Peer = ALICE, body: bytes = b"") -> Response:
        return await self.api.handle(Request("POST", path, (), body), peer)

    async def login(self, peer: Peer = ALICE) -> str:
        """POST /auth/token; the refresh token."""
        grant = answer(await self.post("/auth/token", peer))
        assert isinstance(grant["refresh_token"], str)
        return grant["refresh_token"]

    async def refresh(self, token: str, peer: Peer = ALICE) -> Response:
        return await self.post("/auth/refresh", peer, json.dumps({"refresh_token": token}).encode())


def make_server(
    tmp_path: Path, token_rate: float = 1.0, token_burst: int = 10, max_refresh_families: int = 16
) -> Server:
    keys = KeyStore.open(tmp_path / "keys")
    authority = TokenAuthority(keys, TokenPolicy(lifetime=LIFETIME, leeway=0))
    state = StateStore.open(tmp_path / "state.db")
    policy = Policy.parse(DEFAULT_POLICY, "acl.toml")
    holder: list[Server] = []
    api = HttpApi(
        authority,
        keys,
        state,
        InlineLane(),
        ServerConfig(
            refresh_lifetime=3600,
            token_rate=token_rate,
            token_burst=token_burst,
            max_refresh_families=max_refresh_families,
        ),
        lambda: policy,
        idle_admin(),
        lambda: holder[0].now,
    )
    holder.append(Server(authority, state, api))
    return holder[0]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    made = make_server(tmp_path)
    yield made
    made.state.close()


def answer(response: Response) -> dict[str, object]:
    assert dict(response.headers)["Content-Type"] == "application/json"
    body = json.loads(response.body)
    assert isinstance(body, dict)
    return body


def refusal(response: Response) -> tuple[int, object, object]:
    body = answer(response)
    return response.status, body["error"], body["detail"]


# ---------------------------------------------------------------- 1. bad bodies: 400, a reason

REFRESH = '{"refresh_token": "..."}'
NOT_A_STRING = "refresh_token must be a string, not"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"[" * 8000 + b"]" * 8000, f"body is nested too deeply: send {REFRESH}"),
        (b'{"a":' * 8000 + b"1" + b"}" * 8000, f"body is nested too deeply: send {REFRESH}"),
        (b"1" * 5000, f"body must be a JSON object {REFRESH}, not a number"),
        (b'{"refresh_token": ' + b"9" * 5000 + b"}", f"{NOT_A_STRING} a number"),
        (b'{"refresh_token": 1e999999}', f"{NOT_A_STRING} a number"),
        (b'{"refresh_token": NaN}', f"{NOT_A_STRING} a number"),
        (b"\xff\xfe", f"body must be UTF-8 JSON: {REFRESH}"),
        (b"", f"body is not JSON (Expecting value: line 1 column 1 (char 0)): send {REFRESH}"),
        (b'"abc"', f"body must be a JSON object {REFRESH}, not a string"),
        (b"[]", f"body must be a JSON object {REFRESH}, not an array"),
        (b"null", f"body must be a JSON object {REFRESH}, not null"),
        (b"{}", f"body has no refresh_token: send {REFRESH}"),
        (b'{"refresh_token": "t", "x": 1}', f"body has unknown fields 'x': send {REFRESH}"),
        (b'{"refresh_token": true}', f"{NOT_A_STRING} a boolean"),
        (b'{"refresh_token": {}}', f"{NOT_A_STRING} an object"),
        (b'{"refresh_token": null}', f"{NOT_A_STRING} null"),
        (b'{"refresh_token": ""}', "refresh_token is empty"),
    ],
)
async def test_a_body_that_is_not_one_refresh_token_is_400(
    server: Server, body: bytes, detail: str
) -> None:
    response = await server.post("/auth/refresh", body=body)
    assert refusal(response) == (400, "invalid_request", detail)


@pytest.mark.parametrize("token", ["\ud800", "é" * 10, "x" * 100_000])
async def test_a_refresh_token_that_cannot_be_ours_is_unknown(server: Server, token: str) -> None:
    body = json.dumps({"refresh_token": token}).encode()
    response = await server.post("/auth/refresh", body=body)
    assert refusal(response) == (401, "invalid_refresh", "unknown refresh token")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/auth/refresh", 405, "method_not_allowed"),
        ("BREW", "/auth/token", 405, "method_not_allowed"),
        ("POST", "/.well-known/jwks.json", 405, "method_not_allowed"),
        ("GET", "/auth/" + "x" * 10_000, 404, "not_found"),
        ("GET", "/\x00\r\n", 404, "not_found"),
    ],
)
async def test_every_route_answers_odd_requests_with_json(
    server: Server, method: str, path: str, status: int, code: str
) -> None:
    headers = (("content-type", "text/plain"), ("x", "\x00" * 100))
    response = await server.api.handle(Request(method, path, headers, b"\xff" * 100), ALICE)
    assert refusal(response)[:2] == (status, code)


async def test_the_token_route_ignores_its_body(server: Server) -> None:
    response = await server.post("/auth/token", body=b"[" * 8000)
    assert response.status == 200


# ---------------------------------------------------------------- 2. token requests: 429


def test_a_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("alice", NOW) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("alice", NOW) == 0.5  # one token every 0.5 s
    assert limiter.take("alice", NOW + 0.25) == 0.25  # a refused take takes nothing
    assert limiter.take("alice", NOW + 0.5) == 0.0
    assert limiter.take("alice", NOW + 0.5) == 0.5
    assert limiter.take("bob", NOW + 0.5) == 0.0  # one bucket per key


def test_a_bucket_refills_to_its_burst_and_no_further() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    limiter.take("alice", NOW)
    limiter.take("alice", NOW)
    later = NOW + 1000
    assert [limiter.take("alice", later) for _ in range(3)] == [0.0, 0.0, 1.0]


def test_a_clock_stepping_back_refills_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.take("alice", NOW) == 0.0
    assert limiter.take("alice", NOW - 100) == 1.0


def test_idle_buckets_are_forgotten_once_full_again() -> None:
    limiter = RateLimiter(rate=1.0, burst=10)  # any bucket is full after 10 idle seconds
    for n in range(1000):
        limiter.take(f"user{n}", NOW + n / 1000)
    assert len(limiter) == 1000
    limiter.take("alice", NOW + 10.5)
    assert len(limiter) == 500  # those last used by NOW + 0.5 are full again: gone
    limiter.take("alice", NOW + 20)
    assert len(limiter) == 1


def test_memory_is_bounded_by_the_keys_used_within_burst_over_rate() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    for n in range(100_000):
        limiter.take(f"user{n}", NOW + n)  # one new identity a second
    assert len(limiter) == 2


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_limit_that_cannot_work_is_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate > 0 and burst >= 1"):
        RateLimiter(rate, burst)


async def test_token_requests_beyond_the_burst_get_429_with_retry_after(tmp_path: Path) -> None:
    server = make_server(tmp_path, token_rate=0.25, token_burst=2)
    refresh = await server.login()
    assert (await server.refresh(refresh)).status == 200  # the burst: both routes, one bucket
    for path in ("/auth/token", "/auth/refresh"):
        response = await server.post(path, body=b"[" * 8000)  # counted before the body is read
        assert refusal(response) == (
            429,
            "rate_limited",
            "token requests are limited to 0.25 per second and identity (bursts of 2); "
            "try again in 4.0 s",
        )
        assert ("Retry-After", "4") in response.headers
    assert (await server.post("/auth/token", BOB)).status == 200  # bob has his own bucket
    server.now = NOW + 3.5
    response = await server.post("/auth/token")
    assert refusal(response)[:2] == (429, "rate_limited")
    assert ("Retry-After", "1") in response.headers  # 0.5 s rounds up to 1, never 0
    server.now = NOW + 4
    assert (await server.post("/auth/token")).status == 200
    server.state.close()


async def test_retry_after_is_whole_seconds_rounded_up(tmp_path: Path) -> None:
    server = make_server(tmp_path, token_rate=0.3, token_burst=1)
    assert (await server.post("/auth/token")).status == 200
    response = await server.post("/auth/token")
    assert ("Retry-After", "4") in response.headers  # 3.33 s
    assert "try again in 3.3 s" in str(answer(response)["detail"])
    server.state.close()


# ---------------------------------------------------------------- 3. refresh families per identity

REPLACED = (
    "refresh token replaced by a newer login of the same identity (the server keeps a limited"
    " number per identity); get a new one with POST /auth/token"
)


def family_rows(state: StateStore, sub: str) -> list[tuple[int, int]]:
    """(revoked, tokens) of each family of `sub`, oldest first: what the database holds."""
    return [
        (revoked, tokens)
        for _rowid, revoked, tokens in state._db.execute(
            "SELECT f.rowid, f.revoked, (SELECT count(*) FROM refresh_tokens t"
            " WHERE t.family = f.family) FROM refresh_families f WHERE f.sub = ? ORDER BY f.rowid",
            (sub,),
        )
    ]


async def test_a_login_beyond_the_limit_replaces_the_oldest_family(tmp_path: Path) -> None:
    server = make_server(tmp_path, max_refresh_families=2)
    first, second = await server.login(), await server.login()
    bobs = await server.login(BOB)
    third = await server.login()  # alice's third login: her first family goes
    assert refusal(await server.refresh(first)) == (401, "refresh_expired", REPLACED)
    for token in (second, third):
        assert (await server.refresh(token)).status == 200
    assert (await server.refresh(bobs, BOB)).status == 200  # per identity: bob keeps his
    server.state.close()


def test_the_oldest_families_are_replaced_first_and_dead_ones_forgotten(
    tmp_path: Path,
) -> None:
    state = StateStore.open(tmp_path / "state.db")
    tokens = [state.issue_refresh("alice", "x5t", NOW, 3600, max_families=3) for _ in range(3)]
    assert family_rows(state, "alice") == [(0, 1)] * 3
    for _ in range(5):
        tokens.append(state.issue_refresh("alice", "x5t", NOW, 3600, max_families=3))
    # 3 live and the 3 newest replaced ones are remembered; the 2 oldest are gone.
    assert family_rows(state, "alice") == [(3, 1)] * 3 + [(0, 1)] * 3
    for old in tokens[:2]:
        with pytest.raises(InvalidRefresh, match="unknown refresh token"):
            state.rotate_refresh(old, "alice", "x5t", NOW, 3600)
    for replaced in tokens[2:5]:
        with pytest.raises(RefreshExpired) as caught:
            state.rotate_refresh(replaced, "alice", "x5t", NOW, 3600)
        assert caught.value.detail == REPLACED
    for live in tokens[5:]:
        assert state.rotate_refresh(live, "alice", "x5t", NOW, 3600)
    state.close()


def test_a_replaced_token_past_its_expiry_says_expired(tmp_path: Path) -> None:
    state = StateStore.open(tmp_path / "state.db")
    old = state.issue_refresh("alice", "x5t", NOW, 60, max_families=1)
    state.issue_refresh("alice", "x5t", NOW, 60, max_families=1)
    with pytest.raises(RefreshExpired, match="^refresh token has expired$"):
        state.rotate_refresh(old, "alice", "x5t", NOW + 60, 60)
    state.close()


def test_a_family_keeps_only_its_newest_spent_tokens(tmp_path: Path) -> None:
    state = StateStore.open(tmp_path / "state.db")
    chain = [state.issue_refresh("alice", "x5t", NOW, 3600, max_families=1)]
    for _ in range(MAX_SPENT_KEPT + 10):
        chain.append(state.rotate_refresh(chain[-1], "alice", "x5t", NOW, 3600))
    assert family_rows(state, "alice") == [(0, MAX_SPENT_KEPT + 1)]  # the spent ones + the live
    with pytest.raises(InvalidRefresh, match="unknown refresh token"):  # forgotten: refused
        state.rotate_refresh(chain[0], "alice", "x5t", NOW, 3600)
    with pytest.raises(RefreshReused):  # the replay that matters is still recognised
        state.rotate_refresh(chain[-2], "alice", "x5t", NOW, 3600)
    state.close()


async def test_rows_per_identity_stay_bounded_however_often_it_logs_in(tmp_path: Path) -> None:
    server = make_server(tmp_path, token_rate=1e9, token_burst=10**9, max_refresh_families=4)
    for _ in range(200):
        token = await server.login()
        for _ in range(3):
            token = answer(await server.refresh(token))["refresh_token"]  # type: ignore[assignment]
    rows = family_rows(server.state, "alice")
    assert len(rows) == 8  # 4 live + 4 remembered replaced
    assert sum(tokens for _, tokens in rows) == 8 * 4
    server.state.close()


# ---------------------------------------------------------------- 4. revocation has a time


def claims_issued(at: float, sub: str = "alice", jti: str = "j") -> Claims:
    return Claims("chat", sub, int(at), int(at), int(at) + LIFETIME, jti, "alice-x5t")


def test_unrevoke_does_not_bring_back_tokens_issued_before_the_revocation(
    state: StateStore,
) -> None:
    before = claims_issued(NOW - 10)
    state.revoke_sub("alice", NOW + 0.5)
    assert state.revocations.is_revoked(before)
    assert state.unrevoke_sub("alice")
    assert state.revocations.is_revoked(before)  # still refused
    assert state.revocations.is_revoked(claims_issued(NOW))  # same second: refused too
    assert not state.revocations.is_revoked(claims_issued(NOW + 1))  # new ones work
    assert not state.revocations.is_revoked(claims_issued(NOW - 10, sub="bob"))
    assert not state.is_identity_revoked("alice")


def test_revoking_again_moves_the_time(state: StateStore) -> None:
    state.revoke_sub("alice", NOW)
    state.unrevoke_sub("alice")
    between = claims_issued(NOW + 50)
    state.revoke_sub("alice", NOW + 100)
    state.revoke_sub("alice", NOW + 60)  # an earlier time never moves it back
    state.unrevoke_sub("alice")
    assert state.revocations.is_revoked(between)
    assert state.revocations.is_revoked(claims_issued(NOW + 100))
    assert not state.revocations.is_revoked(claims_issued(NOW + 101))


def test_the_revocation_time_reaches_another_process_snapshot(db_path: Path) -> None:
    server = StateStore.open(db_path)
    operator = StateStore.open(db_path)
    operator.revoke_sub("alice", NOW)
    operator.unrevoke_sub("alice")
    operator.close()
    old = claims_issued(NOW - 1)
    assert not server.revocations.is_revoked(old)  # the snapshot is only read from memory
    server.load_revocations()  # the server's poll
    assert server.revocations.is_revoked(old)
    assert not server.revocations.is_revoked(claims_issued(NOW + 1))
    server.close()


def test_a_database_revoked_before_this_version_keeps_the_time_on_unrevoke(
    db_path: Path,
) -> None:
    state = StateStore.open(db_path)
    with state._write() as db:  # a row as the earlier schema wrote it: no lifted_subs entry
        db.execute("INSERT INTO revoked_subs (sub, revoked_at) VALUES ('alice', ?)", (NOW,))
    state.unrevoke_sub("alice")
    assert state.revocations.is_revoked(claims_issued(NOW - 1))
    state.close()


async def test_after_unrevoke_an_old_token_is_refused_at_the_upgrade(server: Server) -> None:
    old, _ = server.authority.issue("alice", "alice-x5t", NOW - 10)
    server.state.revoke_sub("alice", NOW)
    assert refusal(await server.post("/auth/token"))[:2] == (403, "identity_revoked")
    server.state.unrevoke_sub("alice")
    server.now = NOW + 1
    fresh = answer(await server.post("/auth/token"))["access_token"]
    is_revoked = server.state.revocations.is_revoked  # what the server passes to authorize
    with pytest.raises(TokenRevoked) as caught:
        authorize(upgrade_with(old), ALICE, server.authority, is_revoked, server.now)
    assert refusal(refusal_response(caught.value)) == (
        401,
        "token_revoked",
        "this token has been revoked",
    )
    upgrade = authorize(upgrade_with(str(fresh)), ALICE, server.authority, is_revoked, server.now)
    assert upgrade.claims.sub == "alice"


def upgrade_with(token: str) -> Request:
    return upgrade_request("v12.stomp", f"bearer.{token}")


@pytest.fixture
def state(db_path: Path) -> Iterator[StateStore]:
    store = StateStore.open(db_path)
    yield store
    store.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


# ---------------------------------------------------------------- 5. operator mistakes


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a command (without its `chat-server: `), nothing on stdout."""
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    assert err.startswith("chat-server: ")
    return err.removeprefix("chat-server: ").rstrip("\n")


def serve(state_dir: Path, pki: TestPki) -> int:
    return main(["--state-dir", str(state_dir), "--certs-dir", str(pki.dir), "--port", "0"])


def test_a_state_dir_under_a_file_is_one_line(
    tmp_path: Path, pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "state"
    a_file.write_text("not a directory")
    for state_dir in (a_file, a_file / "x"):
        assert serve(state_dir, pki) == 2
        assert one_line(capsys) == (
            f"cannot open the signing-key store at {state_dir}/keys: {a_file} is not a directory"
        )


def test_a_state_dir_under_dev_null_is_one_line(
    pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve(Path("/dev/null/x"), pki) == 2
    assert one_line(capsys) == (
        "cannot open the signing-key store at /dev/null/x/keys: /dev/null is not a directory"
    )


Lock = Callable[[Path], Path]


@pytest.fixture
def lock() -> Iterator[Lock]:
    """Makes a directory this process cannot write in. Root bypasses file modes but not the
    immutable attribute (ext4, xfs, btrfs: `chattr +i`); where that fails, root skips."""
    locked: list[Path] = []

    def make_unwritable(directory: Path) -> Path:
        if os.geteuid() != 0:
            directory.chmod(0o555)
        else:
            made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"as root only an immutable directory cannot be written: {made.stderr}")
        locked.append(directory)
        return directory

    if os.geteuid() == 0 and shutil.which("chattr") is None:
        pytest.skip("as root only an immutable directory cannot be written, and chattr is absent")
    yield make_unwritable
    for directory in locked:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


UNWRITABLE = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"


def test_a_state_dir_that_cannot_be_written_is_one_line(
    tmp_path: Path, lock: Lock, pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").mkdir()
    unwritable = lock(tmp_path / "state")
    for state_dir in (unwritable, unwritable / "state"):
        assert serve(state_dir, pki) == 2
        assert one_line(capsys) == (
            f"cannot open the signing-key store at {state_dir}/keys: {UNWRITABLE}"
        )
    assert list(unwritable.iterdir()) == []


def make_server_state(state_dir: Path) -> Path:
    """What a server's first start leaves in its state directory (the stores it opens)."""
    KeyStore.open(state_dir / "keys")
    StateStore.open(state_dir / "state.db").close()
    return state_dir


def test_a_state_command_on_state_that_cannot_be_written_is_one_line(
    tmp_path: Path, lock: Lock, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = lock(make_server_state(tmp_path / "state"))
    assert main(["revoke", "--sub", "alice", "--state-dir", str(state_dir)]) == 2
    assert one_line(capsys).startswith(f"cannot open the token state at {state_dir}/state.db: ")


STATE_COMMANDS = [
    (("revoke", "--sub", "alice"), "state.db"),
    (("revoke", "--jti", "some-token-id"), "state.db"),
    (("unrevoke", "--sub", "alice"), "state.db"),
    (("keys", "list"), "keys/keys.json"),
    (("keys", "rotate"), "keys/keys.json"),
]


@pytest.mark.parametrize(("command", "needs"), STATE_COMMANDS)
@pytest.mark.parametrize("exists", [True, False], ids=["empty-dir", "no-dir"])
def test_a_state_command_without_server_state_refuses_and_creates_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: tuple[str, ...],
    needs: str,
    exists: bool,
) -> None:
    state_dir = tmp_path / "typo"
    if exists:
        state_dir.mkdir()
    assert main([*command, "--state-dir", str(state_dir)]) == 2
    assert one_line(capsys) == (
        f"no server state in {state_dir} ({state_dir}/{needs} does not exist); "
        "give the --state-dir the server uses"
    )
    assert list(state_dir.iterdir()) == [] if exists else not state_dir.exists()


def test_state_commands_act_on_a_servers_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = str(tmp_path / "state")
    make_server_state(tmp_path / "state")
    assert main(["revoke", "--sub", "alice", "--state-dir", state_dir]) == 0
    assert main(["unrevoke", "--sub", "alice", "--state-dir", state_dir]) == 0
    assert main(["keys", "rotate", "--state-dir", state_dir]) == 0
    out, err = capsys.readouterr()
    assert "revoked identity 'alice'" in out and "may connect again" in out and err == ""


# ---------------------------------------------------------------- 5. ca.key: only to sign


@pytest.fixture
def certs(tmp_path: Path) -> pki_module.DevPki:
    """What `chat-certs init` makes: CA, server pair, CRL; no clients."""
    layout, _ = pki_module.ensure_dev_pki(tmp_path / "certs", ())
    return layout


def test_without_ca_key_nothing_is_signed_and_nothing_refused(certs: pki_module.DevPki) -> None:
    certs.ca_key.unlink()
    certs.crl.unlink()
    assert pki_module.ensure_dev_pki(certs.directory, ("alice", "bob")) == (certs, [])
    assert sorted(p.name for p in certs.directory.iterdir()) == [
        "ca.crt",
        "server.crt",
        "server.key",
    ]
    pki_module.server_ssl_context(certs.server_cert, certs.server_key, certs.ca)  # serves


def test_without_ca_key_a_missing_server_pair_is_one_line(certs: pki_module.DevPki) -> None:
    certs.ca_key.unlink()
    certs.server_cert.unlink()
    certs.server_key.unlink()
    with pytest.raises(PkiError) as caught:
        pki_module.ensure_dev_pki(certs.directory)
    assert str(caught.value) == (
        f"{certs.ca_key} is missing: it is needed to create {certs.server_cert}; restore it, "
        "or make the server certificate with chat-certs where the CA key is"
    )


def test_a_ca_key_without_its_certificate_is_refused(certs: pki_module.DevPki) -> None:
    certs.ca.unlink()
    with pytest.raises(PkiError, match="ca.key exists but .*ca.crt is missing"):
        pki_module.ensure_dev_pki(certs.directory)


def encrypted_certs(directory: Path, passphrase: bytes) -> pki_module.DevPki:
    """What `chat-certs init --passphrase-env` makes: ca.key and server.key encrypted."""
    layout = pki_module.DevPki.at(directory)
    directory.mkdir()
    ca_key, ca_cert = pki_module.make_ca()
    server_key, server_cert = pki_module.make_server_cert(ca_key, ca_cert, ())
    pki_module.write_private_key(layout.ca_key, ca_key, passphrase)
    pki_module.write_certificate(layout.ca, ca_cert)
    pki_module.write_private_key(layout.server_key, server_key, passphrase)
    pki_module.write_certificate(layout.server_cert, server_cert)
    return layout


def test_an_encrypted_ca_key_signs_with_the_servers_passphrase(tmp_path: Path) -> None:
    layout = encrypted_certs(tmp_path / "certs", b"secret")
    with pytest.raises(KeyPassphraseRequired):
        pki_module.ensure_dev_pki(layout.directory)
    with pytest.raises(WrongPassphrase):
        pki_module.ensure_dev_pki(layout.directory, passphrase=b"wrong")
    _, created = pki_module.ensure_dev_pki(layout.directory, ("alice",), b"secret")
    assert sorted(p.name for p in created) == ["alice.crt", "alice.key", "crl.pem"]
    pki_module.load_private_key(layout.directory / "alice.key")  # clients stay plain
    pki_module.load_crl(layout.crl, pki_module.load_certificate(layout.ca))


def test_a_new_dev_pki_with_a_passphrase_encrypts_the_ca_and_server_keys(tmp_path: Path) -> None:
    layout, _ = pki_module.ensure_dev_pki(tmp_path / "certs", ("alice",), b"secret")
    for key in (layout.ca_key, layout.server_key):
        with pytest.raises(KeyPassphraseRequired):
            pki_module.load_private_key(key)
    pki_module.load_ca(layout, b"secret")
    pki_module.server_ssl_context(layout.server_cert, layout.server_key, layout.ca, None, b"secret")


def test_a_plain_ca_key_ignores_the_servers_passphrase(certs: pki_module.DevPki) -> None:
    _, created = pki_module.ensure_dev_pki(certs.directory, ("alice",), b"server only")
    assert sorted(p.name for p in created) == ["alice.crt", "alice.key"]


async def start_server(
    certs: Path, state: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[trio.Process, int]:
    """`chat-server` as the operator starts it; its port once it says it is ready."""
    process = await trio.lowlevel.open_process(
        [*SERVER, "--port", "0", "--certs-dir", str(certs), "--state-dir", str(state), *args],
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    output = ""
    with trio.fail_after(30):
        while not (ready := re.search(r"ready on https://127\.0\.0\.1:(\d+)", output)):
            chunk = await process.stderr.receive_some(4096)
            assert chunk, output
            output += chunk.decode()
    return process, int(ready.group(1))


async def healthz_as(layout: pki_module.DevPki, port: int, name: str) -> int:
    context = pki_module.client_ssl_context(*layout.client(name), layout.ca)
    running = RunningServer(ChatServer.__new__(ChatServer), port)
    return (await http_request(running, context, "GET", "/healthz")).status


async def stop(process: trio.Process) -> None:
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        assert await process.wait() == 0


async def test_the_server_serves_without_ca_key(tmp_path: Path) -> None:
    layout, _ = pki_module.ensure_dev_pki(tmp_path / "certs", ("alice",))
    layout.ca_key.unlink()
    process, port = await start_server(layout.directory, tmp_path / "state")
    try:
        assert await healthz_as(layout, port, "alice") == 200
    finally:
        await stop(process)


async def test_the_server_makes_dev_clients_with_an_encrypted_ca_key(tmp_path: Path) -> None:
    layout = encrypted_certs(tmp_path / "certs", b"secret")
    env = {**os.environ, "CHAT_TEST_PASSPHRASE": "secret"}
    process, port = await start_server(
        layout.directory, tmp_path / "state", "--passphrase-env", "CHAT_TEST_PASSPHRASE", env=env
    )
    try:
        assert await healthz_as(layout, port, "bob") == 200
    finally:
        await stop(process)


# ---------------------------------------------------------------- 4. over real TLS: live sessions


async def test_revoke_then_unrevoke_still_closes_the_live_session_and_refuses_its_token(
    start_server: Callable[..., Awaitable[RunningServer]], pki: TestPki
) -> None:
    server = await start_server(revocation_poll=0.1)
    token = await token_for(server, pki, "alice")
    async with (
        raw_ws(server, pki, "alice", token=token) as ws,
        stomp_peer(server, pki, "bob") as bob,
    ):
        alice = StompPeer(ws)
        await alice.connect()
        # `chat-server revoke` then `unrevoke` in another process, both before the next poll.
        operator = StateStore.open(server.config.state_dir / "state.db")
        operator.revoke_sub("alice", time.time())
        operator.unrevoke_sub("alice")
        operator.close()
        with trio.fail_after(2):
            frame = await alice.receive(2)
        assert (frame.command, frame.get("message")) == ("ERROR", "token revoked")
        await bob.send("SEND", {"destination": "/topic/x", "receipt": "bob-ok"})
        assert (await bob.receive()).get("receipt-id") == "bob-ok"
    upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", f"v12.stomp, bearer.{token}"),
    ]
    reply = await http_request(server, pki.client_context("alice"), "GET", "/ws", upgrade)
    assert (reply.status, reply.json()["error"]) == (401, "token_revoked")
