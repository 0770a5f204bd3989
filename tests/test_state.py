"""Refresh tokens and revocations in SQLite (PROTOCOL.md §7)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat.protocol.errors import HttpRefusal
from chat.protocol.tokens import (
    Claims,
    IdentityRevoked,
    InvalidRefresh,
    RefreshExpired,
    RefreshReused,
    TokenCertMismatch,
)
from chat.store.state import StateStore

NOW = 1_700_000_000.0
DAY = 86400.0
X5T = "alice-thumbprint"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def state(db_path: Path) -> Iterator[StateStore]:
    store = StateStore.open(db_path)
    yield store
    store.close()


def _claims(sub: str = "alice", jti: str = "j1", exp: int = int(NOW) + 300) -> Claims:
    return Claims("chat", sub, int(NOW), int(NOW), exp, jti, X5T)


def _rotate_refused(
    state: StateStore,
    token: str,
    kind: type[HttpRefusal],
    sub: str = "alice",
    x5t: str = X5T,
    now: float = NOW,
) -> HttpRefusal:
    with pytest.raises(HttpRefusal) as caught:
        state.rotate_refresh(token, sub, x5t, now, DAY)
    assert type(caught.value) is kind
    assert not token or token not in caught.value.detail
    return caught.value


# ---------------------------------------------------------------- refresh tokens


def test_refresh_rotation_happy_path(state: StateStore) -> None:
    first = state.issue_refresh("alice", X5T, NOW, DAY)
    second = state.rotate_refresh(first, "alice", X5T, NOW + 10, DAY)
    third = state.rotate_refresh(second, "alice", X5T, NOW + 20, DAY)
    assert len({first, second, third}) == 3
    assert len(first) >= 43  # 32 random bytes, base64url


def test_reusing_a_spent_token_revokes_the_whole_family(state: StateStore) -> None:
    first = state.issue_refresh("alice", X5T, NOW, DAY)
    second = state.rotate_refresh(first, "alice", X5T, NOW, DAY)
    newest = state.rotate_refresh(second, "alice", X5T, NOW, DAY)
    error = _rotate_refused(state, first, RefreshReused)
    assert (error.status, error.code) == (401, "refresh_reused")
    # the owner's newest token now says why too: the family was revoked for reuse
    _rotate_refused(state, newest, RefreshReused)
    _rotate_refused(state, second, RefreshReused)


def test_reuse_leaves_other_families_alone(state: StateStore) -> None:
    stolen = state.issue_refresh("alice", X5T, NOW, DAY)
    other = state.issue_refresh("alice", X5T, NOW, DAY)
    state.rotate_refresh(stolen, "alice", X5T, NOW, DAY)
    _rotate_refused(state, stolen, RefreshReused)
    assert state.rotate_refresh(other, "alice", X5T, NOW, DAY)


def test_family_of_a_blocked_identity_is_invalid_not_reused(state: StateStore) -> None:
    token = state.issue_refresh("alice", X5T, NOW, DAY)
    state.revoke_sub("alice", NOW)
    _rotate_refused(state, token, InvalidRefresh)


def test_refresh_expiry(state: StateStore) -> None:
    token = state.issue_refresh("alice", X5T, NOW, 60)
    error = _rotate_refused(state, token, RefreshExpired, now=NOW + 60)
    assert (error.status, error.code) == (401, "refresh_expired")
    assert state.rotate_refresh(token, "alice", X5T, NOW + 59, 60)


def test_rotated_token_gets_a_fresh_lifetime(state: StateStore) -> None:
    first = state.issue_refresh("alice", X5T, NOW, 60)
    second = state.rotate_refresh(first, "alice", X5T, NOW + 50, 60)
    assert state.rotate_refresh(second, "alice", X5T, NOW + 100, 60)


@pytest.mark.parametrize(("sub", "x5t"), [("mallory", X5T), ("alice", "another-cert")])
def test_refresh_bound_to_another_certificate_is_refused(
    state: StateStore, sub: str, x5t: str
) -> None:
    token = state.issue_refresh("alice", X5T, NOW, DAY)
    error = _rotate_refused(state, token, TokenCertMismatch, sub=sub, x5t=x5t)
    assert (error.status, error.code) == (403, "token_cert_mismatch")
    assert state.rotate_refresh(token, "alice", X5T, NOW, DAY)  # not spent by the attempt


@pytest.mark.parametrize("token", ["", "not-a-token", "x" * 10_000, "\ud800", "é" * 10])
def test_unknown_refresh_token_is_invalid(state: StateStore, token: str) -> None:
    error = _rotate_refused(state, token, InvalidRefresh)
    assert (error.status, error.code) == (401, "invalid_refresh")


def test_only_hashes_reach_the_disk(state: StateStore, db_path: Path) -> None:
    tokens = [state.issue_refresh("alice", X5T, NOW, DAY)]
    tokens.append(state.rotate_refresh(tokens[0], "alice", X5T, NOW, DAY))
    state.close()
    files = [path for path in db_path.parent.iterdir() if path.name.startswith(db_path.name)]
    contents = b"".join(path.read_bytes() for path in files)
    assert b"alice" in contents  # the check can see what is stored
    for token in tokens:
        assert token.encode() not in contents


def test_state_file_is_owner_only(state: StateStore, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_prune_drops_expired_refresh_tokens(state: StateStore) -> None:
    token = state.issue_refresh("alice", X5T, NOW, 60)
    state.prune(NOW + 60)
    _rotate_refused(state, token, InvalidRefresh, now=NOW + 61)


# ---------------------------------------------------------------- revocations


def test_revoke_sub_blocks_tokens_refresh_and_issuance(state: StateStore) -> None:
    refresh = state.issue_refresh("alice", X5T, NOW, DAY)
    state.revoke_sub("alice", NOW)
    assert state.is_identity_revoked("alice")
    assert state.is_revoked(_claims())
    assert not state.is_revoked(_claims(sub="bob"))
    _rotate_refused(state, refresh, InvalidRefresh)
    with pytest.raises(IdentityRevoked):
        state.issue_refresh("alice", X5T, NOW, DAY)


def test_unrevoke_sub_lifts_the_block_but_not_old_families(state: StateStore) -> None:
    refresh = state.issue_refresh("alice", X5T, NOW, DAY)
    state.revoke_sub("alice", NOW)
    assert state.unrevoke_sub("alice") is True
    assert state.unrevoke_sub("alice") is False
    assert not state.is_identity_revoked("alice")
    assert state.is_revoked(_claims())  # issued before the revocation: it stays refused
    _rotate_refused(state, refresh, InvalidRefresh)
    assert state.issue_refresh("alice", X5T, NOW, DAY)


def test_revoke_jti_revokes_only_that_token(state: StateStore) -> None:
    state.revoke_jti("j1", NOW + 300)
    assert state.is_revoked(_claims(jti="j1"))
    assert not state.is_revoked(_claims(jti="j2"))
    assert not state.is_identity_revoked("alice")


def test_revoked_jti_outlives_its_exp_by_the_retention_margin(state: StateStore) -> None:
    state.revoke_jti("j1", NOW)
    state.prune(NOW + 1)  # exp passed, but a verifier's leeway may still accept the token
    assert state.is_revoked(_claims(jti="j1"))
    state.prune(NOW + 3600)
    assert not state.is_revoked(_claims(jti="j1"))


def test_revocation_version_moves_on_every_change(state: StateStore) -> None:
    versions = [state.revocation_version()]
    state.issue_refresh("alice", X5T, NOW, DAY)
    assert state.revocation_version() == versions[-1]  # refresh traffic is not a revocation
    for change in (
        lambda: state.revoke_sub("alice", NOW),
        lambda: state.unrevoke_sub("alice"),
        lambda: state.revoke_jti("j1", NOW + 300),
    ):
        change()
        versions.append(state.revocation_version())
    assert versions == sorted(set(versions))


def test_two_stores_on_one_file_see_each_others_revocations(
    state: StateStore, db_path: Path
) -> None:
    operator = StateStore.open(db_path)  # e.g. `chat-server revoke` in another process
    try:
        before = state.revocation_version()
        operator.revoke_sub("alice", NOW)
        operator.revoke_jti("j9", NOW + 300)
        assert state.revocation_version() > before
        assert state.is_identity_revoked("alice")
        assert state.is_revoked(_claims(sub="bob", jti="j9"))
        assert operator.unrevoke_sub("alice")
        assert not state.is_identity_revoked("alice")
    finally:
        operator.close()


def test_the_snapshot_shows_own_changes_at_once_and_others_once_loaded(
    state: StateStore, db_path: Path
) -> None:
    assert state.revocations.version == state.revocation_version()
    state.revoke_jti("j1", NOW + 300)
    assert state.revocations.is_revoked(_claims(jti="j1"))  # this store's own change
    operator = StateStore.open(db_path)  # `chat-server revoke` in another process
    try:
        operator.revoke_sub("bob", NOW)
        assert not state.revocations.is_identity_revoked("bob")  # from memory: not yet
        assert state.load_revocations().is_identity_revoked("bob")
        assert state.revocations.is_revoked(_claims(sub="bob", jti="j2"))
        assert state.revocations.version == operator.revocation_version()
    finally:
        operator.close()


def test_pruned_jtis_leave_the_snapshot(state: StateStore) -> None:
    state.revoke_jti("j1", NOW)
    assert state.revocations.jtis == {"j1"}
    state.prune(NOW + 3600)
    assert state.revocations.jtis == frozenset()


def test_reuse_detected_through_another_store(state: StateStore, db_path: Path) -> None:
    first = state.issue_refresh("alice", X5T, NOW, DAY)
    newest = state.rotate_refresh(first, "alice", X5T, NOW, DAY)
    other = StateStore.open(db_path)
    try:
        _rotate_refused(other, first, RefreshReused)
    finally:
        other.close()
    _rotate_refused(state, newest, RefreshReused)


def test_state_survives_reopen(state: StateStore, db_path: Path) -> None:
    refresh = state.issue_refresh("alice", X5T, NOW, DAY)
    state.revoke_jti("j1", NOW + 300)
    state.close()
    reopened = StateStore.open(db_path)
    try:
        assert reopened.is_revoked(_claims(jti="j1"))
        assert reopened.rotate_refresh(refresh, "alice", X5T, NOW, DAY)
    finally:
        reopened.close()
