"""SharedMap behaves as a dict would under any sequence of changes, and a change shares every
bucket it did not touch with the map it was made from (what makes a revocation cost a few
buckets in a snapshot of many keys)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy.store.shared import SharedMap

changes = st.lists(st.tuples(st.dictionaries(st.integers(0, 60), st.integers()), st.lists(st.integers(0, 60))),
                   max_size=25)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 60), st.integers()), changes)
def test_a_shared_map_changes_as_a_dict_would_and_its_predecessors_stay(start, steps):
    model, shared = dict(start), SharedMap(start)
    history = [(dict(model), shared)]
    for put, removed in steps:
        for key in removed:
            model.pop(key, None)
        model.update(put)
        shared = shared.changed(put, removed)
        history.append((dict(model), shared))
    for expected, mapped in history:  # each map as it was made: a change never altered one before it
        assert dict(mapped) == expected and len(mapped) == len(expected) and mapped == expected
        assert all(mapped[key] == value and key in mapped and mapped.get(key) == value for key, value in expected.items())
        assert -1 not in mapped and mapped.get(-1, "none") == "none"


def test_a_change_copies_only_the_buckets_it_touches():
    keys = SharedMap({f"key-{number}": number for number in range(10_000)})
    revoked = keys.changed({}, ["key-5"])
    shared = sum(old is new for old, new in zip(keys._buckets, revoked._buckets))
    assert len(keys._buckets) == 100 and shared == 99
    assert "key-5" in keys and "key-5" not in revoked and len(revoked) == 9_999
