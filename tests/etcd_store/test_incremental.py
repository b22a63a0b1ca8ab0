"""with_keys_changed: applying key changes one by one gives the snapshot build_snapshot gives for the result
(its refresh deadline no later); it names the keys it changed, so that the management API's diff of
those alone finds the events a diff of every key finds; and a change of no key copies nothing."""
from __future__ import annotations

from dataclasses import replace

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy.management.objects import snapshot_events
from fastproxy.store.base import AccessKey, Team, User, build_snapshot, key_digest, with_keys_changed

NOW = 1_800_000_000.0
USERS = [User("alice", groups=("devs",)), User("bob", disabled=True)]
TEAMS = [Team("ops", members=("alice",), groups=("admins",))]


def key(number: int, variant: int) -> AccessKey:
    """Key `number` in one of a few states: usable, disabled, expired, a disabled user's, a team's, activity-bound."""
    owner = {"user": "bob"} if variant == 3 else {"team": "ops"} if variant == 4 else {"user": "alice"}
    return AccessKey(f"k{number}", "User", owner.get("user"), owner.get("team"), key_digest(f"s{number}-{variant}"),
                     disabled=variant == 1, ttl=10 if variant in (2, 5) else 0, created=NOW - 100 if variant == 2 else NOW,
                     ttl_after_last_activity=variant == 5, last_activity=NOW if variant == 5 else None)


changes = st.lists(st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(0, 5))), max_size=30)


@settings(max_examples=60, deadline=None)
@given(changes)
def test_applied_changes_equal_a_full_build(steps):
    keys: dict[str, AccessKey] = {}
    snapshot = build_snapshot(0, USERS, TEAMS, [], [], NOW)
    for version, (number, variant) in enumerate(steps, 1):
        if variant is None:
            keys.pop(f"k{number}", None)
            snapshot = with_keys_changed(snapshot, version, [], [f"k{number}"], NOW)
        else:
            keys[f"k{number}"] = key(number, variant)
            snapshot = with_keys_changed(snapshot, version, [keys[f"k{number}"]], [], NOW)
        full = build_snapshot(version, USERS, TEAMS, keys.values(), [], NOW)
        assert (snapshot.version, dict(snapshot.access_keys)) == (full.version, dict(full.access_keys))
        assert snapshot.refresh_at <= full.refresh_at  # a removed key's earlier deadline stays: a refresh comes early, never late
        assert dict(snapshot.keys) == dict(full.keys)


def _events(old, new):
    events = snapshot_events(old, new, lambda instance: ("", ""))
    return sorted((event.version, event.type, event.resource, orjson.dumps(event.object, option=orjson.OPT_SORT_KEYS))
                  for event in events)


@settings(max_examples=60, deadline=None)
@given(changes)
def test_the_diff_of_the_changed_keys_alone_finds_what_the_diff_of_all_finds(steps):
    snapshot = build_snapshot(0, USERS, TEAMS, [key(number, number) for number in range(6)], [], NOW)
    for version, (number, variant) in enumerate(steps, 1):
        old = snapshot
        changed = [] if variant is None else [replace(key(number, variant), resource_version=version)]
        snapshot = with_keys_changed(old, version, changed, [f"k{number}"] if variant is None else [], NOW)
        assert snapshot.key_changes.base() is old and snapshot.key_changes.names == {f"k{number}"}
        every_key = replace(snapshot, key_changes=None)  # as a full build: the diff compares every key
        assert _events(old, snapshot) == _events(old, every_key)


def test_a_change_of_no_key_copies_nothing():
    snapshot = build_snapshot(3, USERS, TEAMS, [key(number, 0) for number in range(3)], [], NOW)
    after = with_keys_changed(snapshot, 4, [], [], NOW)
    assert after.version == 4 and after.key_changes.names == frozenset() and after.key_changes.base() is snapshot
    assert after.keys is snapshot.keys and after.access_keys is snapshot.access_keys and after.users is snapshot.users
    assert _events(snapshot, after) == []
