"""A revocation on etcd is one round trip (what a fleet waits for on every revocation), and still
answers as the store contract asks: the deleted key with its last activity, NotFoundError for a
missing key, ConflictError for a stale expected_version, with nothing deleted."""
from __future__ import annotations

import pytest

from fastproxy.store import ConflictError, NotFoundError

NOW = 1_800_000_000.0


@pytest.fixture
def alice(store):
    store.create_user("alice")
    return store


def calls_made(store, write):
    """The requests to etcd that `write(store)` makes, by method."""
    made, call = [], store.client.call

    def counted(method, body):
        made.append(method)
        return call(method, body)
    store.client.call = counted
    try:
        write(store)
    finally:
        store.client.call = call
    return made


def test_a_revocation_is_one_transaction(alice):
    alice.create_access_key(user="alice", name="k")
    assert calls_made(alice, lambda store: store.revoke_access_key("k")) == ["kv/txn"]
    with pytest.raises(NotFoundError):
        alice.get_access_key("k")


def test_the_deleted_key_comes_back_with_its_last_activity_and_its_activity_is_gone(alice):
    key, _ = alice.create_access_key(user="alice", name="k", now=NOW)
    alice.record_activity({"k": NOW + 5})
    deleted = alice.delete_access_key("k")
    assert (deleted.name, deleted.digest, deleted.uid, deleted.last_activity) == ("k", key.digest, key.uid, NOW + 5)
    assert deleted.resource_version > key.resource_version
    alice.create_access_key(user="alice", name="k", now=NOW)  # the same name again: no activity of the old key
    assert alice.get_access_key("k").last_activity is None


def test_a_missing_key_or_a_stale_version_deletes_nothing(alice):
    key, _ = alice.create_access_key(user="alice", name="k")
    with pytest.raises(NotFoundError, match="access key 'ghost' does not exist"):
        alice.delete_access_key("ghost", expected_version=key.resource_version)
    for stale in (0, key.resource_version - 1, key.resource_version + 1):
        with pytest.raises(ConflictError, match="access key 'k' has been modified"):
            alice.delete_access_key("k", expected_version=stale)
    assert alice.get_access_key("k") == key
