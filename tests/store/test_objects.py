"""Users, teams and access keys as a Kubernetes-style API server needs them: object metadata,
resource versions that order every write, precondition conflicts, refusals of each kind, and deletes
that take what depends on the object with them."""
from __future__ import annotations

import re
import sqlite3
import time

import pytest

from fastproxy.auth.passwords import hash_password
from fastproxy.auth.scopes import ScopeError
from fastproxy.store import (
    AccessKey,
    AlreadyExistsError,
    ConflictError,
    InvalidError,
    InvalidScopeError,
    NotFoundError,
    StoreError,
    Team,
    User,
)
from fastproxy.store.base import ANNOTATIONS_MAX_BYTES
from fastproxy.store.sqlite import _MIGRATIONS, SqliteStore

NOW = 1_800_000_000.0
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")


@pytest.fixture
def alice(store):
    store.create_user("alice", groups=["devs"])
    store.create_team("ops", members=["alice"])
    return store


def generation(store: SqliteStore) -> int:
    return store.load_snapshot().version


# ---- metadata ----

def test_create_returns_the_stored_object_with_uid_and_version(store):
    user = store.create_user("alice", description="on call", labels={"app.kubernetes.io/team": "ops", "tier": ""},
                             annotations={"note": "x" * 1000})
    assert UUID4.match(user.uid)
    assert user.resource_version == generation(store) > 0
    assert store.get_user("alice") == user
    assert (user.description, user.labels, user.annotations) == (
        "on call", {"app.kubernetes.io/team": "ops", "tier": ""}, {"note": "x" * 1000})
    team = store.create_team("ops", members=["alice"], display_name="Operations", labels={"a": "b"})
    assert store.get_team("ops") == team
    assert (team.display_name, team.members, team.labels) == ("Operations", ("alice",), {"a": "b"})
    key, _ = store.create_access_key(user="alice", name="k", description="ci", annotations={"by": "me"})
    assert store.get_access_key("k") == key
    assert (key.description, key.annotations, key.labels) == ("ci", {"by": "me"}, {})
    assert len({user.uid, team.uid, key.uid}) == 3


def test_uid_never_changes_and_a_recreated_object_gets_a_new_one(store):
    uid = store.create_user("alice").uid
    assert store.update_user("alice", email="a@example.com").uid == uid
    assert store.get_user("alice").uid == uid
    store.delete_user("alice")
    assert store.create_user("alice").uid != uid


def test_equality_compares_label_contents_and_users_stay_hashable():
    assert User("a", labels={"x": "1"}) == User("a", labels={"x": "1"})
    assert User("a", labels={"x": "1"}) != User("a", labels={"x": "2"})
    assert Team("t", annotations={"n": "1"}) != Team("t")
    assert len({User("a", labels={"x": "1"}), User("a", labels={"x": "1"})}) == 1


def test_snapshot_holds_every_access_key_by_name_and_only_usable_ones_by_digest(alice):
    usable, secret = alice.create_access_key(user="alice", name="usable", now=NOW)
    alice.create_access_key(user="alice", name="disabled", now=NOW)
    alice.disable_access_key("disabled")
    alice.create_access_key(user="alice", name="expired", ttl=10, now=NOW - 100)
    snapshot = alice.load_snapshot(now=NOW)
    assert sorted(snapshot.access_keys) == ["disabled", "expired", "usable"]
    assert snapshot.access_keys["disabled"].disabled
    assert snapshot.access_keys["usable"] == alice.get_access_key("usable")
    assert [entry.access_key.name for entry in snapshot.keys.values()] == ["usable"]
    assert snapshot.resolve(secret, NOW).access_key == usable


def test_a_snapshot_of_ten_thousand_users_loads_well_under_a_second(store):
    for number in range(10_000):
        store.create_user(f"user-{number}", groups=["devs"], labels={"team": "a"})
    started = time.perf_counter()
    snapshot = store.load_snapshot()
    took = time.perf_counter() - started
    assert len(snapshot.users) == 10_000
    assert snapshot.users["user-9999"].labels == {"team": "a"}
    assert took < 0.5


# ---- resource versions ----

def test_every_write_stamps_its_objects_with_the_generation_it_ends_at(store):
    versions = []

    def wrote(obj):
        assert obj.resource_version == generation(store)
        assert not store.changed_since(obj.resource_version)
        versions.append(obj.resource_version)
    wrote(store.create_user("alice"))
    wrote(store.create_user("bob"))
    wrote(store.create_team("ops", members=["alice", "bob"]))  # three rows, one version: the last
    wrote(store.create_access_key(user="alice", name="k")[0])
    wrote(store.update_user("alice", email="a@example.com"))
    wrote(store.update_team("ops", members=["alice"]))
    wrote(store.update_access_key("k", display_name="laptop"))
    wrote(store.delete_access_key("k"))
    wrote(store.delete_user("bob"))
    assert versions == sorted(set(versions))  # strictly increasing


def test_an_update_that_changes_nothing_writes_nothing(alice):
    user = alice.get_user("alice")
    version = generation(alice)
    assert alice.update_user("alice", groups=["devs"], labels={}) == user
    assert alice.update_team("ops", members=["alice"]).resource_version == alice.get_team("ops").resource_version
    assert generation(alice) == version


def test_activity_changes_neither_the_keys_version_nor_the_generation(alice):
    key, _ = alice.create_access_key(user="alice", name="k")
    alice.record_activity({"k": NOW})
    stored = alice.get_access_key("k")
    assert stored.last_activity == NOW
    assert stored.resource_version == key.resource_version == generation(alice)


def test_membership_changes_are_changes_of_the_team(alice):
    alice.create_user("bob")
    before = alice.get_team("ops").resource_version
    team = alice.update_team("ops", members=["alice", "bob"])
    assert team.members == ("alice", "bob")
    assert team.resource_version > before
    assert alice.get_team("ops") == team


# ---- preconditions ----

READ = {"user": lambda s: s.get_user("alice"), "team": lambda s: s.get_team("ops"), "key": lambda s: s.get_access_key("k")}


@pytest.mark.parametrize("kind, write", [
    ("user", lambda s, v: s.update_user("alice", expected_version=v, email="new@example.com")),
    ("team", lambda s, v: s.update_team("ops", expected_version=v, description="new")),
    ("key", lambda s, v: s.update_access_key("k", expected_version=v, description="new")),
    ("user", lambda s, v: s.delete_user("alice", expected_version=v)),
    ("team", lambda s, v: s.delete_team("ops", expected_version=v)),
    ("key", lambda s, v: s.delete_access_key("k", expected_version=v)),
])
def test_a_stale_expected_version_conflicts_and_the_current_one_writes(alice, kind, write):
    alice.create_access_key(user="alice", name="k")
    current = READ[kind](alice)
    version = generation(alice)
    with pytest.raises(ConflictError, match="has been modified; please apply your changes to the latest version and try again$"):
        write(alice, current.resource_version - 1)
    assert READ[kind](alice) == current and generation(alice) == version  # refused: nothing written
    assert write(alice, current.resource_version).resource_version == generation(alice) > version


def test_conflict_names_the_object(alice):
    user = alice.get_user("alice")
    alice.update_user("alice", expected_version=user.resource_version, display_name="Alice")
    with pytest.raises(ConflictError) as raised:
        alice.update_user("alice", expected_version=user.resource_version, display_name="Al")
    assert str(raised.value) == ("user 'alice' has been modified; please apply your changes to the latest version "
                                 "and try again")
    assert alice.get_user("alice").display_name == "Alice"


# ---- refusals, by kind ----

@pytest.mark.parametrize("call, kind, message", [
    (lambda s: s.get_user("ghost"), NotFoundError, "user 'ghost' does not exist"),
    (lambda s: s.get_team("ghost"), NotFoundError, "team 'ghost' does not exist"),
    (lambda s: s.get_access_key("ghost"), NotFoundError, "access key 'ghost' does not exist"),
    (lambda s: s.update_user("ghost", email="x"), NotFoundError, "user 'ghost' does not exist"),
    (lambda s: s.update_team("ghost", description="x"), NotFoundError, "team 'ghost' does not exist"),
    (lambda s: s.update_access_key("ghost", disabled=True), NotFoundError, "access key 'ghost' does not exist"),
    (lambda s: s.delete_user("ghost"), NotFoundError, "user 'ghost' does not exist"),
    (lambda s: s.delete_team("ghost"), NotFoundError, "team 'ghost' does not exist"),
    (lambda s: s.delete_access_key("ghost"), NotFoundError, "access key 'ghost' does not exist"),
    (lambda s: s.disable_user("ghost"), NotFoundError, "user 'ghost' does not exist"),
    (lambda s: s.disable_access_key("ghost"), NotFoundError, "access key 'ghost' does not exist"),
    (lambda s: s.revoke_access_key("ghost"), NotFoundError, "access key 'ghost' does not exist"),
    (lambda s: s.create_access_key(user="ghost"), NotFoundError, "user 'ghost' does not exist"),
    (lambda s: s.create_access_key(team="ghost"), NotFoundError, "team 'ghost' does not exist"),
    (lambda s: s.create_user("alice"), AlreadyExistsError, "user 'alice' already exists"),
    (lambda s: s.create_team("ops"), AlreadyExistsError, "team 'ops' already exists"),
    (lambda s: s.create_access_key(user="alice", name="k"), AlreadyExistsError, "access key 'k' already exists"),
    (lambda s: s.get_user(["alice"]), NotFoundError, "user ['alice'] does not exist"),
    (lambda s: s.update_team(None, description="x"), NotFoundError, "team None does not exist"),
    (lambda s: s.delete_access_key(5), NotFoundError, "access key 5 does not exist"),
])
def test_refusals_have_their_kind(alice, call, kind, message):
    alice.create_access_key(user="alice", name="k")
    with pytest.raises(kind) as raised:
        call(alice)
    assert str(raised.value) == message
    assert isinstance(raised.value, StoreError)


@pytest.mark.parametrize("call, field, message", [
    (lambda s: s.create_user("Bob"), "name", "user name 'Bob' is not valid: use lower-case letters, digits, '-' and '.'"),
    (lambda s: s.create_team("-ops"), "name", "team name '-ops' is not valid: use lower-case letters, digits, '-' and '.'"),
    (lambda s: s.create_access_key(user="alice", name="a_b"), "name",
     "access key name 'a_b' is not valid: use lower-case letters, digits, '-' and '.'"),
    (lambda s: s.create_user("bob", email=5), "email", "email 5 is not a string"),
    (lambda s: s.create_user("bob", groups="devs"), "groups", "groups 'devs' is not a list of strings"),
    (lambda s: s.create_user("bob", groups=["a\nb"]), "groups",
     "group 'a\\nb' must be non-empty, without CR, LF, NUL or other control characters and without leading or "
     "trailing spaces"),
    (lambda s: s.update_user("alice", subject=" root"), "subject",
     "subject ' root' must be non-empty, without CR, LF, NUL or other control characters and without leading or "
     "trailing spaces"),
    (lambda s: s.update_user("alice", disabled="yes"), "disabled", "disabled 'yes' is not true or false"),
    (lambda s: s.update_user("alice", description=None), "description", "description None is not a string"),
    (lambda s: s.create_team("dev", members=["ghost"]), "members", "team member 'ghost' is not a user"),
    (lambda s: s.update_team("ops", members=["alice", "ghost"]), "members", "team member 'ghost' is not a user"),
    (lambda s: s.update_team("ops", members="alice"), "members", "members 'alice' is not a list of strings"),
    (lambda s: s.update_team("ops", members=[1]), "members", "team member 1 is not a user name"),
    (lambda s: s.update_access_key("k", display_name=["x"]), "display_name", "display_name ['x'] is not a string"),
    (lambda s: s.create_access_key(), "user", "an access key belongs to exactly one user or one team"),
    (lambda s: s.create_access_key(user="alice", type="Reset"), "type",
     "access key type 'Reset' is not one of Login, User, Other"),
    (lambda s: s.create_access_key(user="alice", ttl=1.5), "ttl", "ttl 1.5 must be a whole number of seconds, 0 for no expiry"),
    (lambda s: s.create_access_key(user="alice", ttl_after_last_activity=True), "ttl_after_last_activity",
     "ttlAfterLastActivity needs a ttl"),
    (lambda s: s.create_access_key(user="alice", ttl=60, ttl_after_last_activity="yes"), "ttl_after_last_activity",
     "ttl_after_last_activity 'yes' is not true or false"),
    (lambda s: s.create_access_key(user={"name": "alice"}), "user", "access key owner {'name': 'alice'} is not a user name"),
    (lambda s: s.create_access_key(team=["ops"]), "team", "access key owner ['ops'] is not a team name"),
    (lambda s: s.revoke_token(["j"], time.time() + 60), "jti", "token id ['j'] is not a non-empty string"),
    (lambda s: s.revoke_token("", time.time() + 60), "jti", "token id '' is not a non-empty string"),
    (lambda s: s.revoke_token("j", "soon"), "expires_at", "token expiry 'soon' is not a unix time"),
])
def test_invalid_values_name_their_field(alice, call, field, message):
    alice.create_access_key(user="alice", name="k")
    version = generation(alice)
    with pytest.raises(InvalidError) as raised:
        call(alice)
    assert (raised.value.field, str(raised.value)) == (field, message)
    assert generation(alice) == version


def test_a_bad_scope_is_invalid_and_still_a_scope_error(alice):
    alice.create_access_key(user="alice", name="k", scope={"clusters": [{"cluster": "prod"}]})
    for call in (lambda: alice.update_access_key("k", scope={"rules": [{"verb": ["get"]}]}),
                 lambda: alice.create_access_key(user="alice", scope='{"rules": [{"verb": ["get"]}]}')):
        with pytest.raises(InvalidScopeError) as raised:
            call()
        assert isinstance(raised.value, InvalidError) and isinstance(raised.value, ScopeError)
        assert (raised.value.field, str(raised.value)) == ("scope", "scope: unknown key 'rules[0].verb'")
    assert alice.get_access_key("k").scope == {"clusters": [{"cluster": "prod"}]}


def test_a_field_the_kind_does_not_have_is_a_programming_error(alice):
    alice.create_access_key(user="alice", name="k")
    with pytest.raises(TypeError, match="^there is no user field 'nickname' that can be set$"):
        alice.update_user("alice", nickname="al")
    with pytest.raises(TypeError, match="^there is no access key field 'user' that can be set$"):
        alice.update_access_key("k", user="bob")
    with pytest.raises(TypeError, match="^there is no access key field 'ttl' that can be set$"):
        alice.update_access_key("k", ttl=5)


# ---- labels and annotations ----

GOOD_LABELS = {"app": "web", "app.kubernetes.io/name": "fast-proxy_1.0", "example.com/empty": "", "A-b_c.D": "X",
               "n" * 63: "v" * 63, f"{'p' * 253}/name": "1"}


def test_labels_kubernetes_allows_are_stored(store):
    assert store.create_user("alice", labels=GOOD_LABELS).labels == GOOD_LABELS
    assert store.get_user("alice").labels == GOOD_LABELS


@pytest.mark.parametrize("labels, message", [
    ({"n" * 64: "v"}, f"label key {'n' * 64!r} is not valid"),
    ({"-app": "v"}, "label key '-app' is not valid"),
    ({"app-": "v"}, "label key 'app-' is not valid"),
    ({"": "v"}, "label key '' is not valid"),
    ({"app name": "v"}, "label key 'app name' is not valid"),
    ({"Example.com/app": "v"}, "label key 'Example.com/app' is not valid"),
    ({"example.com/": "v"}, "label key 'example.com/' is not valid"),
    ({"/app": "v"}, "label key '/app' is not valid"),
    ({"a/b/c": "v"}, "label key 'a/b/c' is not valid"),
    ({f"{'p' * 254}/name": "v"}, f"label key '{'p' * 254}/name' is not valid"),
    ({"app": "v" * 64}, f"label 'app': value {'v' * 64!r} is not valid"),
    ({"app": "-v"}, "label 'app': value '-v' is not valid"),
    ({"app": "a/b"}, "label 'app': value 'a/b' is not valid"),
    ({"app": 1}, "label 'app': value 1 is not a string"),
    ({1: "v"}, "label key 1 is not valid"),
    (["app"], "labels must be a map of strings, not list"),
])
def test_labels_kubernetes_refuses_are_refused_naming_the_key(store, labels, message):
    with pytest.raises(InvalidError) as raised:
        store.create_user("alice", labels=labels)
    assert raised.value.field == "labels"
    assert str(raised.value).startswith(message)
    store.create_user("alice")
    with pytest.raises(InvalidError, match=f"^{re.escape(message)}"):
        store.update_user("alice", labels=labels)
    assert store.get_user("alice").labels == {}


def test_annotations_may_be_large_up_to_the_kubernetes_limit(alice):
    applied = "k" * 40 + "x" * (ANNOTATIONS_MAX_BYTES - 40 - len("kubectl.kubernetes.io/last-applied-configuration"))
    annotations = {"kubectl.kubernetes.io/last-applied-configuration": applied}
    assert alice.update_team("ops", annotations=annotations).annotations == annotations
    assert alice.get_team("ops").annotations == annotations
    with pytest.raises(InvalidError) as raised:
        alice.update_team("ops", annotations={**annotations, "more": "x"})
    assert raised.value.field == "annotations"
    assert str(raised.value) == f"annotations are {ANNOTATIONS_MAX_BYTES + 5} bytes in all, more than the 262144 allowed"
    assert alice.get_team("ops").annotations == annotations


def test_annotation_keys_are_checked_and_values_may_be_any_text(store):
    assert store.create_user("alice", annotations={"note": "any text: ü, spaces, /slashes/\n"}).annotations == {
        "note": "any text: ü, spaces, /slashes/\n"}
    with pytest.raises(InvalidError, match="^annotation key 'bad key' is not valid") as raised:
        store.update_user("alice", annotations={"bad key": "v"})
    assert raised.value.field == "annotations"
    with pytest.raises(InvalidError, match="^annotation 'note': value 5 is not a string$"):
        store.update_user("alice", annotations={"note": 5})


# ---- updates ----

@pytest.mark.parametrize("field, value", [
    ("username", "alice.smith"), ("display_name", "Alice Smith"), ("email", "alice@example.com"),
    ("subject", "alice@corp.example"), ("groups", ("devs", "admins")), ("disabled", True),
    ("description", "the first user"), ("labels", {"team": "ops"}), ("annotations", {"note": "hello"}),
])
def test_update_user_sets_each_field(alice, field, value):
    before = alice.get_user("alice")
    updated = alice.update_user("alice", **{field: value})
    assert getattr(updated, field) == value
    assert updated.resource_version > before.resource_version
    assert alice.get_user("alice") == updated
    assert {name: getattr(updated, name) for name in User.__dataclass_fields__ if name not in (field, "resource_version")} == {
        name: getattr(before, name) for name in User.__dataclass_fields__ if name not in (field, "resource_version")}


def test_empty_username_and_subject_stand_for_the_name(alice):
    alice.update_user("alice", username="al", subject="al@corp")
    user = alice.update_user("alice", username="", subject="")
    assert (user.username, user.subject) == ("alice", "alice")


def test_labels_and_annotations_are_replaced_wholly(alice):
    alice.update_user("alice", labels={"a": "1", "b": "2"}, annotations={"x": "1"})
    user = alice.update_user("alice", labels={"b": "3"})
    assert (user.labels, user.annotations) == ({"b": "3"}, {"x": "1"})
    assert alice.update_user("alice", annotations={}).annotations == {}


@pytest.mark.parametrize("field, value", [
    ("display_name", "Operations"), ("description", "on call"), ("groups", ("oncall", "sre")),
    ("members", ("alice", "bob")), ("labels", {"team": "ops"}), ("annotations", {"note": "hello"}),
])
def test_update_team_sets_each_field(alice, field, value):
    alice.create_user("bob")
    before = alice.get_team("ops")
    updated = alice.update_team("ops", **{field: value})
    assert getattr(updated, field) == value
    assert updated.resource_version > before.resource_version
    assert alice.get_team("ops") == updated
    assert alice.list_teams() == [updated]


def test_team_members_are_kept_sorted_and_unique_and_reach_identities(alice):
    alice.create_user("bob")
    _, secret = alice.create_access_key(user="bob", now=NOW)
    assert alice.update_team("ops", members=["bob", "alice", "bob"]).members == ("alice", "bob")
    assert "loft:team:ops" in alice.load_snapshot(now=NOW).resolve(secret, NOW).identity.groups
    assert alice.update_team("ops", members=[]).members == ()
    assert "loft:team:ops" not in alice.load_snapshot(now=NOW).resolve(secret, NOW).identity.groups


@pytest.mark.parametrize("field, value", [
    ("display_name", "laptop"), ("description", "ci key"), ("disabled", True),
    ("scope", {"clusters": [{"cluster": "prod"}]}), ("labels", {"kind": "ci"}), ("annotations", {"note": "hello"}),
])
def test_update_access_key_sets_each_field_and_keeps_the_rest(alice, field, value):
    before, secret = alice.create_access_key(user="alice", name="k", ttl=3600, type="Other", now=NOW)
    updated = alice.update_access_key("k", **{field: value})
    assert getattr(updated, field) == value
    assert updated.resource_version > before.resource_version
    assert alice.get_access_key("k") == updated
    assert (updated.digest, updated.user, updated.team, updated.type, updated.ttl, updated.created, updated.uid) == (
        before.digest, "alice", None, "Other", 3600, NOW, before.uid)
    assert (alice.load_snapshot(now=NOW).resolve(secret, NOW) is None) == (field == "disabled")


def test_a_scope_may_be_cleared_and_given_as_json(alice):
    alice.create_access_key(user="alice", name="k", scope={"clusters": [{"cluster": "prod"}]})
    assert alice.update_access_key("k", scope=None).scope is None
    assert alice.update_access_key("k", scope='{"clusters": [{"cluster": "dev"}]}').scope == {"clusters": [{"cluster": "dev"}]}


# ---- deletes ----

def test_deleting_a_user_takes_its_keys_and_memberships(alice):
    alice.create_user("bob")
    alice.create_team("qa", members=["alice", "bob"])
    alice.create_access_key(user="alice", name="alice-key")
    bob_key, _ = alice.create_access_key(user="bob", name="bob-key")
    team_key, _ = alice.create_access_key(team="ops", name="ops-key")
    user = alice.get_user("alice")
    deleted = alice.delete_user("alice")
    assert deleted == User(**{**{name: getattr(user, name) for name in User.__dataclass_fields__},
                              "resource_version": generation(alice)})
    with pytest.raises(NotFoundError):
        alice.get_user("alice")
    assert [key.name for key in alice.list_access_keys()] == ["bob-key", "ops-key"]
    assert [(team.name, team.members, team.resource_version) for team in alice.list_teams()] == [
        ("ops", (), deleted.resource_version), ("qa", ("bob",), deleted.resource_version)]
    snapshot = alice.load_snapshot()
    assert sorted(snapshot.users) == ["bob"] and sorted(snapshot.access_keys) == ["bob-key", "ops-key"]


def test_deleting_a_team_takes_its_keys_not_its_members(alice):
    alice.create_access_key(team="ops", name="ops-key")
    alice.create_access_key(user="alice", name="alice-key")
    team = alice.get_team("ops")
    deleted = alice.delete_team("ops")
    assert (deleted.name, deleted.members, deleted.uid) == ("ops", ("alice",), team.uid)
    assert deleted.resource_version == generation(alice) > team.resource_version
    assert alice.list_teams() == []
    assert [key.name for key in alice.list_access_keys()] == ["alice-key"]
    assert [user.name for user in alice.list_users()] == ["alice"]
    alice.create_team("ops")  # its memberships went with it
    assert alice.get_team("ops").members == ()


def test_delete_access_key_returns_the_deleted_key(alice):
    key, secret = alice.create_access_key(user="alice", name="k", now=NOW)
    deleted = alice.delete_access_key("k")
    assert (deleted.name, deleted.digest, deleted.uid) == ("k", key.digest, key.uid)
    assert deleted.resource_version == generation(alice) > key.resource_version
    snapshot = alice.load_snapshot(now=NOW)
    assert "k" not in snapshot.access_keys and snapshot.resolve(secret, NOW) is None


# ---- two workers, one file ----

def test_two_stores_on_one_file_see_and_respect_each_others_writes(alice, tmp_path):
    other = SqliteStore(tmp_path / "state.db")
    try:
        seen = other.get_user("alice")
        assert seen == alice.get_user("alice")
        written = alice.update_user("alice", expected_version=seen.resource_version, email="a@example.com")
        assert other.get_user("alice") == written
        with pytest.raises(ConflictError):
            other.update_user("alice", expected_version=seen.resource_version, email="b@example.com")
        again = other.update_user("alice", expected_version=written.resource_version, email="b@example.com")
        assert again.resource_version > written.resource_version
        assert alice.get_user("alice") == again
        other.create_user("bob")
        with pytest.raises(AlreadyExistsError):
            alice.create_user("bob")
        assert other.load_snapshot().version == alice.load_snapshot().version == generation(other)
    finally:
        other.close()


# ---- schema ----

def test_migration_gives_existing_objects_a_uid_and_a_version(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    for statement in _MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO users VALUES ('alice', 'alice', '', '', 'alice', '[]', 0, ?)", (NOW,))
    db.execute("INSERT INTO users VALUES ('bob', 'bob', '', '', 'bob', '[]', 0, ?)", (NOW,))
    db.execute("INSERT INTO teams VALUES ('ops', '[\"oncall\"]', ?)", (NOW,))
    db.execute("INSERT INTO team_members VALUES ('ops', 'alice')")
    db.execute("INSERT INTO access_keys VALUES ('k', 'User', '', 'alice', NULL, x'00', 0, 0, 0, NULL, ?, NULL)", (NOW,))
    db.commit()
    version = db.execute("SELECT generation FROM meta").fetchone()[0]
    db.close()
    store = SqliteStore(path)
    try:
        objects = [*store.list_users(), *store.list_teams(), *store.list_access_keys()]
        assert all(UUID4.match(obj.uid) for obj in objects)
        assert len({obj.uid for obj in objects}) == 4
        assert {obj.resource_version for obj in objects} == {version} == {generation(store)}
        assert store.get_team("ops") == Team("ops", ("alice",), ("oncall",), NOW, "", store.get_team("ops").uid,
                                             {}, {}, "", version)
        assert isinstance(store.get_access_key("k"), AccessKey) and store.get_access_key("k").labels == {}
        assert store.update_team("ops", display_name="Ops").resource_version == generation(store) > version
    finally:
        store.close()


def test_migration_4_adds_passwords_and_a_password_change_reloads_every_reader(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    for migration in _MIGRATIONS[:3]:
        for statement in migration:
            db.execute(statement)
    db.execute("PRAGMA user_version = 3")
    db.execute("INSERT INTO users (name, username, display_name, email, subject, groups, disabled, created) "
               "VALUES ('alice', 'alice', '', '', 'alice', '[]', 0, ?)", (NOW,))
    db.commit()
    db.close()
    store = SqliteStore(path)
    try:
        assert store.get_user("alice").password_hash == ""
        before = generation(store)
        hashed = hash_password("a long enough password")
        updated = store.update_user("alice", password_hash=hashed)
        assert updated.password_hash == hashed and hashed not in repr(updated)
        assert generation(store) > before  # the users trigger counts the new column
        assert store.load_snapshot().users["alice"].password_hash == hashed
        created = store.create_user("bob", password_hash=hashed)
        assert store.get_user("bob").password_hash == created.password_hash == hashed
        assert store.update_user("alice", password_hash="").password_hash == ""
        for wrong in ("a long enough password", "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA", 7):
            with pytest.raises(InvalidError, match="password_hash is not an argon2id hash") as refused:
                store.update_user("alice", password_hash=wrong)
            assert refused.value.field == "password" and "long enough" not in str(refused.value)
    finally:
        store.close()
