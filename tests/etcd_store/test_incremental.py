"""with_keys_changed: applying key changes one by one gives the snapshot build_snapshot gives for the result
(its refresh deadline no later)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
        assert (snapshot.version, snapshot.access_keys) == (full.version, full.access_keys)
        assert snapshot.refresh_at <= full.refresh_at  # a removed key's earlier deadline stays: a refresh comes early, never late
        assert snapshot.keys == full.keys
