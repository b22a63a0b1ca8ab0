"""The snapshot's key maps under changes: each change gives what a dict would, and never alters
the map it was made from (a reader may still hold that snapshot)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy.store.base import _changed

changes = st.lists(st.dictionaries(st.integers(0, 60), st.one_of(st.none(), st.integers())), max_size=25)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 60), st.integers()), changes)
def test_changes_apply_as_to_a_dict_and_leave_earlier_maps_alone(start, steps):
    model, mapped = dict(start), start
    history = [(dict(model), mapped)]
    for step in steps:
        for key, value in step.items():
            if value is None:
                model.pop(key, None)
            else:
                model[key] = value
        mapped = _changed(mapped, step)
        history.append((dict(model), mapped))
    for expected, found in history:  # each map as it was made
        assert dict(found) == expected and len(found) == len(expected)
        assert all(found[key] == value and found.get(key) == value for key, value in expected.items())
        assert -1 not in found and found.get(-1, "none") == "none"
