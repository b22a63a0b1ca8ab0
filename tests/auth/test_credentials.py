"""Authenticator: the order of credential sources, the store snapshot kept fresh off the event
loop, batched activity, and the edge gateway's JWKS and revocation files re-read on change."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time

import pytest

from fastproxy.auth import credentials
from fastproxy.auth.credentials import Authenticator
from fastproxy.auth.tokens import KeySet, issue_token
from fastproxy.config import ConfigError, parse_config
from fastproxy.status import StatusError
from fastproxy.store import sqlite
from fastproxy.store.sqlite import SqliteStore

STATIC = "static-key-0123456789"
ISSUER = "https://gw.example"


def make_config(folder, state=True, tokens=None):
    (folder / "token").write_text("t")
    data = {"clusters": [{"name": "prod", "server": "https://10.0.0.1:6443", "token_file": str(folder / "token")}],
            "access_keys": [{"name": "static", "key_sha256": hashlib.sha256(STATIC.encode()).hexdigest(),
                             "user": "static-user"}]}
    if state:
        data["state"] = {"path": str(folder / "state.db")}
    if tokens is not None:
        data["tokens"] = {"issuer": ISSUER, **tokens}
    return parse_config(data)


@pytest.fixture
def store(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    store.create_user("alice")
    yield store
    store.close()


def refusal(authenticator, credential, cluster="prod") -> str:
    with pytest.raises(StatusError) as caught:
        authenticator.authenticate(credential, cluster)
    assert caught.value.code == 401
    return caught.value.message


def test_static_then_store_then_tokens(tmp_path, store):
    _, key = store.create_access_key(user="alice", name="k")
    config = make_config(tmp_path, tokens={"signing_keys_dir": str(tmp_path / "keys")})
    authenticator = Authenticator(config)
    try:
        assert authenticator.authenticate(STATIC.encode(), "prod").user == "static-user"
        assert authenticator.authenticate(key.encode(), "prod").source == "k"
        token = issue_token(KeySet(tmp_path / "keys"), issuer=ISSUER, subject="bob", audience="prod", groups=[], ttl=60)
        assert authenticator.authenticate(token.encode(), "prod").user == "bob"
        assert refusal(authenticator, token.encode(), "staging") == "Unauthorized: token is not valid for cluster 'staging'"
        assert refusal(authenticator, b"a.b.c") == "Unauthorized: token is malformed"
        assert refusal(authenticator, b"\xff.b.c") == "Unauthorized: invalid access key"
        assert refusal(authenticator, b"unknown") == "Unauthorized: invalid access key"
    finally:
        authenticator.close()


def test_without_a_verifier_a_token_is_just_an_unknown_key(tmp_path, store):
    authenticator = Authenticator(make_config(tmp_path))
    assert refusal(authenticator, b"eyJ.eyJ.sig") == "Unauthorized: invalid access key"
    authenticator.close()


def run_loop(authenticator, scenario):
    async def main():
        authenticator.start(asyncio.get_running_loop())
        try:
            return await scenario()
        finally:
            authenticator.close()
    return asyncio.run(main())


async def eventually(predicate, seconds=2.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    return time.monotonic()


def test_changes_in_another_connection_are_picked_up_within_a_poll(tmp_path, store):
    _, key = store.create_access_key(user="alice", name="k")
    authenticator = Authenticator(make_config(tmp_path))

    def usable():
        try:
            authenticator.authenticate(key.encode(), "prod")
            return True
        except StatusError:
            return False

    async def scenario():
        assert usable()
        store.disable_access_key("k")  # another connection, as the CLI would be
        changed = time.monotonic()
        return await eventually(lambda: not usable()) - changed
    assert run_loop(authenticator, scenario) < 3 * sqlite.POLL_INTERVAL


def test_an_unreadable_store_keeps_the_last_snapshot_and_says_so_once(tmp_path, store, caplog, monkeypatch):
    _, key = store.create_access_key(user="alice", name="k")
    authenticator = Authenticator(make_config(tmp_path))
    real = authenticator.store.reader.store.generations
    broken = {"on": True}

    def generations():
        if broken["on"]:
            raise OSError("disk on fire")
        return real()
    monkeypatch.setattr(authenticator.store.reader.store, "generations", generations)

    async def scenario():
        await asyncio.sleep(4 * sqlite.POLL_INTERVAL)
        assert authenticator.authenticate(key.encode(), "prod").source == "k"
        broken["on"] = False
        await eventually(lambda: not authenticator.store.reader.failing)
    with caplog.at_level(logging.INFO, logger="fastproxy.store"):
        run_loop(authenticator, scenario)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [f"state store {tmp_path / 'state.db'} cannot be read: disk on fire",
                        f"state store {tmp_path / 'state.db'} readable again"]


def test_activity_is_batched_and_written_off_the_loop(tmp_path, store, monkeypatch):
    _, key = store.create_access_key(user="alice", name="k")
    monkeypatch.setattr(credentials, "ACTIVITY_FLUSH_INTERVAL", 0.0)
    authenticator = Authenticator(make_config(tmp_path))

    async def scenario():
        authenticator.authenticate(key.encode(), "prod")
        used = time.time()
        authenticator.tick()
        await eventually(lambda: store.list_access_keys()[0].last_activity is not None)
        return used
    used = run_loop(authenticator, scenario)
    assert abs(store.list_access_keys()[0].last_activity - used) < 1


def test_activity_left_at_shutdown_is_written(tmp_path, store):
    _, key = store.create_access_key(user="alice", name="k")
    authenticator = Authenticator(make_config(tmp_path))
    authenticator.authenticate(key.encode(), "prod")
    authenticator.close()
    assert store.list_access_keys()[0].last_activity is not None


def test_edge_files_are_read_again_when_they_change(tmp_path, caplog):
    central = KeySet(tmp_path / "central")
    (tmp_path / "jwks.json").write_text(json.dumps(KeySet(tmp_path / "other").jwks()))
    (tmp_path / "revoked.txt").write_text("")
    authenticator = Authenticator(make_config(tmp_path, state=False, tokens={
        "jwks_file": str(tmp_path / "jwks.json"), "revocation_file": str(tmp_path / "revoked.txt")}))
    token = issue_token(central, issuer=ISSUER, subject="bob", audience="prod", groups=[], ttl=60)
    assert refusal(authenticator, token.encode()).startswith("Unauthorized: token key id ")
    (tmp_path / "jwks.json").write_text(json.dumps(central.jwks()))
    authenticator.tick()
    assert authenticator.authenticate(token.encode(), "prod").user == "bob"

    jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["jti"]
    (tmp_path / "revoked.txt").write_text(jti + "\n")
    authenticator.tick()
    assert refusal(authenticator, token.encode()) == "Unauthorized: token has been revoked"

    (tmp_path / "revoked.txt").write_text("[broken json")
    (tmp_path / "jwks.json").write_text("{}")
    with caplog.at_level(logging.ERROR, logger="fastproxy.auth"):
        authenticator.tick()
    assert refusal(authenticator, token.encode()) == "Unauthorized: token has been revoked"  # previous list kept
    assert [record.getMessage().split(":")[0] for record in caplog.records] == [
        "tokens.revocation_file", "tokens.jwks_file"]
    authenticator.close()


@pytest.mark.parametrize("setup,tokens,message", [
    (lambda folder: (folder / "state.db").write_text("not a database, not at all, not even close"), None,
     "state.path: cannot open state file"),
    (lambda folder: (folder / "revoked.txt").write_text("[1, 2]"), {"signing_keys_dir": "keys", "revocation_file": "revoked.txt"},
     "tokens.revocation_file: revocation list"),
    (lambda folder: (folder / "keys").mkdir() or (folder / "keys" / "1.RS256.key.pem").write_text("junk"),
     {"signing_keys_dir": "keys"}, "tokens.signing_keys_dir: signing key"),
])
def test_unusable_sources_fail_at_start_naming_the_key(tmp_path, setup, tokens, message):
    setup(tmp_path)
    if tokens is not None:
        tokens = {key: str(tmp_path / value) for key, value in tokens.items()}
    with pytest.raises(ConfigError, match=f"^{message}"):
        Authenticator(make_config(tmp_path, state=tokens is None, tokens=tokens))


def test_a_verified_static_key_is_found_again_without_its_digest(tmp_path, monkeypatch):
    authenticator = Authenticator(make_config(tmp_path, state=False))
    digests = []
    real = hashlib.sha256
    monkeypatch.setattr(credentials.hashlib, "sha256", lambda data: digests.append(data) or real(data))
    first = authenticator.authenticate(STATIC.encode(), "prod")
    again = authenticator.authenticate(STATIC.encode(), "prod")
    assert first is again and first.user == "static-user" and digests == [STATIC.encode()]
    assert "invalid access key" in refusal(authenticator, b"not-" + STATIC.encode())
    assert len(authenticator.static.verified) == 1  # refused keys are not kept


def test_a_verified_entry_answers_only_for_its_own_key(tmp_path):
    authenticator = Authenticator(make_config(tmp_path, state=False))
    identity = authenticator.authenticate(STATIC.encode(), "prod")
    # As if another key's hash collided with the verified one's: the comparison still tells them apart.
    authenticator.static.verified[hash(b"another-key")] = (STATIC.encode(), identity)
    assert "invalid access key" in refusal(authenticator, b"another-key")


def test_a_static_key_removed_by_a_reload_is_refused_though_it_was_verified(tmp_path):
    authenticator = Authenticator(make_config(tmp_path, state=False))
    assert authenticator.authenticate(STATIC.encode(), "prod").user == "static-user"
    without = parse_config({"clusters": [{"name": "prod", "server": "https://10.0.0.1:6443",
                                          "token_file": str(tmp_path / "token")}]})
    authenticator.static = credentials.StaticKeys(without)  # as Gateway.reload does
    assert "invalid access key" in refusal(authenticator, STATIC.encode())
