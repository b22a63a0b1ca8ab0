"""The SQLite store: what resolves and what must not, change detection across processes, the schema."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from fastproxy.auth.identity import HeaderValueError, identity_header_lines
from fastproxy.auth.requestinfo import request_info
from fastproxy.auth.scopes import CompiledScope, ScopeError, check_scope
from fastproxy.store import StoreError, build_identity
from fastproxy.store.base import ACTIVITY_REFRESH_SECONDS
from fastproxy.store.sqlite import _MIGRATIONS, SqliteStore

NOW = 1_800_000_000.0
BAD_VALUE = "must be non-empty, without CR, LF, NUL or other control characters and without leading or trailing spaces"


@pytest.fixture
def alice(store):
    store.create_user("alice", display_name="Alice", email="alice@example.com", groups=["devs", "admins"])
    store.create_team("ops", members=["alice"], groups=["oncall"])
    return store


# ---- identities ----

def test_user_key_resolves_to_the_users_identity(alice):
    key, secret = alice.create_access_key(user="alice", name="laptop", now=NOW)
    resolved = alice.load_snapshot(now=NOW).resolve(secret, NOW)
    identity = resolved.identity
    assert resolved.access_key.name == "laptop"
    assert identity.user == "alice"
    assert identity.groups == ("devs", "admins", "oncall", "loft:team:ops", "system:authenticated",
                               "loft:authenticated", "loft:user:alice")
    assert identity.source == "laptop"
    assert identity.scope is None
    assert identity.impersonation == (
        b"Impersonate-User: alice\r\n"
        b"Impersonate-Group: devs\r\nImpersonate-Group: admins\r\nImpersonate-Group: oncall\r\n"
        b"Impersonate-Group: loft:team:ops\r\nImpersonate-Group: system:authenticated\r\n"
        b"Impersonate-Group: loft:authenticated\r\nImpersonate-Group: loft:user:alice\r\n")


def test_team_key_resolves_to_the_team(alice):
    _, secret = alice.create_access_key(team="ops", now=NOW)
    identity = alice.load_snapshot(now=NOW).resolve(secret, NOW).identity
    assert identity.user == "loft:team:ops"
    assert identity.groups == ("oncall", "system:authenticated", "loft:authenticated", "loft:team:ops")


def test_subject_is_the_impersonated_user(store):
    store.create_user("bob", subject="bob@corp.example")
    _, secret = store.create_access_key(user="bob", now=NOW)
    assert store.load_snapshot(now=NOW).resolve(secret, NOW).identity.user == "bob@corp.example"


def test_scoped_key_carries_its_compiled_scope(alice):
    _, secret = alice.create_access_key(user="alice", scope='{"clusters": [{"cluster": "prod"}]}', now=NOW)
    scope = alice.load_snapshot(now=NOW).resolve(secret, NOW).identity.scope
    assert isinstance(scope, CompiledScope)
    assert check_scope(scope, request_info("GET", "/api/v1/pods", ""), "Cluster", "prod") is None
    assert check_scope(scope, request_info("GET", "/api/v1/pods", ""), "Cluster", "dev") is not None
    assert alice.list_access_keys()[0].scope == {"clusters": [{"cluster": "prod"}]}


def test_only_a_digest_of_the_key_is_stored(alice, tmp_path):
    key, secret = alice.create_access_key(user="alice", now=NOW)
    assert key.digest == hashlib.sha256(secret.encode()).digest()
    alice.close()
    raw = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert secret.encode() not in raw
    assert key.digest in raw


def test_wrong_key_does_not_resolve(alice):
    _, secret = alice.create_access_key(user="alice", now=NOW)
    snapshot = alice.load_snapshot(now=NOW)
    assert snapshot.resolve(secret[:-1] + ("A" if secret[-1] != "A" else "B"), NOW) is None
    assert snapshot.resolve("", NOW) is None


# ---- what must not resolve ----

def test_disabled_key_does_not_resolve(alice):
    _, secret = alice.create_access_key(user="alice", name="k", now=NOW)
    alice.disable_access_key("k")
    assert alice.load_snapshot(now=NOW).resolve(secret, NOW) is None


def test_revoked_key_does_not_resolve(alice):
    _, secret = alice.create_access_key(user="alice", name="k", now=NOW)
    alice.revoke_access_key("k")
    assert alice.load_snapshot(now=NOW).resolve(secret, NOW) is None
    assert alice.list_access_keys() == []


def test_disabled_user_keys_do_not_resolve_but_team_keys_do(alice):
    _, user_secret = alice.create_access_key(user="alice", now=NOW)
    _, team_secret = alice.create_access_key(team="ops", now=NOW)
    alice.disable_user("alice")
    snapshot = alice.load_snapshot(now=NOW)
    assert snapshot.resolve(user_secret, NOW) is None
    assert snapshot.resolve(team_secret, NOW) is not None
    assert alice.list_users()[0].disabled


def test_ttl_expiry(alice):
    _, secret = alice.create_access_key(user="alice", ttl=100, now=NOW)
    assert alice.load_snapshot(now=NOW + 99).resolve(secret, NOW + 99) is not None
    assert alice.load_snapshot(now=NOW + 100).resolve(secret, NOW + 100) is None
    # a snapshot loaded before the expiry still refuses the key after it
    assert alice.load_snapshot(now=NOW).resolve(secret, NOW + 100) is None


def test_ttl_after_last_activity(alice):
    key, secret = alice.create_access_key(user="alice", ttl=100, ttl_after_last_activity=True, now=NOW)
    assert alice.load_snapshot(now=NOW + 150).resolve(secret, NOW + 150) is None  # never used
    alice.record_activity({key.name: NOW + 90})
    assert alice.load_snapshot(now=NOW + 150).resolve(secret, NOW + 150) is not None
    assert alice.load_snapshot(now=NOW + 190).resolve(secret, NOW + 190) is None


def test_activity_only_moves_forward(alice):
    key, _ = alice.create_access_key(user="alice", now=NOW)
    alice.record_activity({key.name: NOW + 50})
    alice.record_activity({key.name: NOW + 10, "no-such-key": NOW})
    assert alice.list_access_keys()[0].last_activity == NOW + 50


def test_refresh_deadline_follows_the_shortest_activity_ttl(alice):
    assert alice.load_snapshot(now=NOW).refresh_at == NOW + ACTIVITY_REFRESH_SECONDS
    alice.create_access_key(user="alice", ttl=40, ttl_after_last_activity=True, now=NOW)
    assert alice.load_snapshot(now=NOW).refresh_at == NOW + 10


def test_revoked_token_ids_reach_the_snapshot(store):
    store.revoke_token("jti-1", time.time() + 60)
    store.revoke_token("jti-old", time.time() - 1)
    assert store.load_snapshot().revoked_tokens == {"jti-1", "jti-old"}
    store.revoke_token("jti-2", time.time() + 60)  # expired ids are pruned on the next write
    assert store.load_snapshot().revoked_tokens == {"jti-1", "jti-2"}


# ---- refused writes ----

@pytest.mark.parametrize("call, message", [
    (lambda s: s.create_user("alice"), "user 'alice' already exists"),
    (lambda s: s.create_user("Bob"), "user name 'Bob' is not valid: use lower-case letters, digits, '-' and '.'"),
    (lambda s: s.create_user("bob", subject="bob\r\nImpersonate-Group: system:masters"),
     f"subject 'bob\\r\\nImpersonate-Group: system:masters' {BAD_VALUE}"),
    (lambda s: s.create_user("bob", groups=["ok", "evil\nImpersonate-User: admin"]),
     f"group 'evil\\nImpersonate-User: admin' {BAD_VALUE}"),
    (lambda s: s.create_user("bob", groups=["nul\x00"]), f"group 'nul\\x00' {BAD_VALUE}"),
    (lambda s: s.create_user("bob", groups=[" system:masters"]), f"group ' system:masters' {BAD_VALUE}"),
    (lambda s: s.create_team("ops"), "team 'ops' already exists"),
    (lambda s: s.create_team("dev", members=["ghost"]), "team member 'ghost' is not a user"),
    (lambda s: s.create_team("dev", groups=["a\rb"]), f"group 'a\\rb' {BAD_VALUE}"),
    (lambda s: s.create_access_key(), "an access key belongs to exactly one user or one team"),
    (lambda s: s.create_access_key(user="alice", team="ops"), "an access key belongs to exactly one user or one team"),
    (lambda s: s.create_access_key(user="ghost"), "user 'ghost' does not exist"),
    (lambda s: s.create_access_key(team="ghost"), "team 'ghost' does not exist"),
    (lambda s: s.create_access_key(user="alice", type="Reset"),
     "access key type 'Reset' is not one of Login, User, Other"),
    (lambda s: s.create_access_key(user="alice", ttl=-1), "ttl -1 must be a whole number of seconds, 0 for no expiry"),
    (lambda s: s.create_access_key(user="alice", ttl_after_last_activity=True), "ttlAfterLastActivity needs a ttl"),
    (lambda s: s.create_access_key(user="alice", name="UPPER"),
     "access key name 'UPPER' is not valid: use lower-case letters, digits, '-' and '.'"),
    (lambda s: s.disable_user("ghost"), "user 'ghost' does not exist"),
    (lambda s: s.disable_access_key("ghost"), "access key 'ghost' does not exist"),
    (lambda s: s.revoke_access_key("ghost"), "access key 'ghost' does not exist"),
])
def test_refused_writes(alice, call, message):
    with pytest.raises(StoreError) as raised:
        call(alice)
    assert str(raised.value) == message


def test_duplicate_key_name_and_bad_scope(alice):
    alice.create_access_key(user="alice", name="k")
    with pytest.raises(StoreError, match="^access key 'k' already exists$"):
        alice.create_access_key(user="alice", name="k")
    with pytest.raises(ScopeError, match=r"^scope: unknown key 'rules\[0\].verb'$"):
        alice.create_access_key(user="alice", scope={"rules": [{"verb": ["get"]}]})


def test_identity_header_lines_refuse_unsafe_values():
    assert identity_header_lines("u", ["g"]) == b"Impersonate-User: u\r\nImpersonate-Group: g\r\n"
    assert identity_header_lines("ü", []) == "Impersonate-User: ü\r\n".encode()
    with pytest.raises(HeaderValueError, match="^user 'u\\\\r' must"):
        identity_header_lines("u\r", [])
    with pytest.raises(StoreError, match="^group ' g' must"):  # the store says it as a StoreError
        build_identity("u", [" g"], "k", None)


# ---- change detection ----

def test_every_identity_write_bumps_the_version_but_activity_does_not(alice):
    version = alice.load_snapshot().version
    assert not alice.changed_since(version)
    key, _ = alice.create_access_key(user="alice")
    assert alice.changed_since(version)
    version = alice.load_snapshot().version
    alice.record_activity({key.name: time.time()})
    assert not alice.changed_since(version)
    for write in (lambda: alice.create_user("carol"), lambda: alice.create_team("qa", members=["carol"]),
                  lambda: alice.disable_user("carol"), lambda: alice.disable_access_key(key.name),
                  lambda: alice.revoke_access_key(key.name), lambda: alice.revoke_token("j", time.time() + 9)):
        write()
        assert alice.changed_since(version)
        version = alice.load_snapshot().version


def test_a_second_connection_sees_changes(alice, tmp_path):
    other = SqliteStore(tmp_path / "state.db")
    version = other.load_snapshot().version
    _, secret = alice.create_access_key(user="alice")
    assert other.changed_since(version)
    assert other.load_snapshot().resolve(secret, time.time()) is not None
    other.close()


def test_a_change_from_another_process_is_seen(alice, tmp_path):
    version = alice.load_snapshot().version
    output = subprocess.run(
        [sys.executable, "-m", "fastproxy.store.commands", "accesskey", "create", "--user", "alice",
         "--state", str(tmp_path / "state.db")], capture_output=True, text=True, check=True).stdout
    written = time.monotonic()
    secret = output.split("key: ")[1].strip()
    while not alice.changed_since(version):
        assert time.monotonic() - written < 10, "change not seen"
        time.sleep(0.25)
    assert alice.load_snapshot().resolve(secret, time.time()).identity.user == "alice"


def _open_files(path: str) -> int:
    """How many of this process's file descriptors are open on `path`."""
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path))


def _child_reads(store, queue):
    inherited = _open_files(store.path)
    read = (store.changed_since(-1), [user.name for user in store.list_users()])
    queue.put((*read, inherited, _open_files(store.path)))


def test_a_forked_worker_opens_its_own_connection(alice):
    alice.list_users()  # the parent's connection is open before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_reads, args=(alice, queue))
    child.start()
    changed, users, inherited, after = queue.get(timeout=10)
    assert (changed, users) == (True, ["alice"])
    assert inherited == 1 and after == 2  # the parent's descriptor, then one the child opened itself
    child.join(10)
    assert child.exitcode == 0
    assert [user.name for user in alice.list_users()] == ["alice"]


# ---- schema ----

def test_schema_is_versioned_and_in_wal_mode(store, tmp_path):
    store.create_user("alice")
    store.close()
    SqliteStore(tmp_path / "state.db").close()  # reopening migrates nothing and loses nothing
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS) == 6
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT name FROM users").fetchall() == [("alice",)]
    db.close()


def test_a_newer_schema_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match=rf"schema version 99, newer than this fastproxy understands \({len(_MIGRATIONS)}\)$"):
        SqliteStore(tmp_path / "state.db")
