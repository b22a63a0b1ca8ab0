"""The Kubernetes conventions shared by the management API and the simulated cluster: selectors, patches."""
from __future__ import annotations

import pytest

from fastproxy.kube.patch import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, apply_patch
from fastproxy.kube.selectors import FieldSelector, LabelSelector
from fastproxy.status import StatusError


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ("app=web", {"app": "web"}, True),
    ("app==web,tier!=db", {"app": "web", "tier": "db"}, False),
    ("app in (web, api)", {"app": "api"}, True),
    ("app notin (web)", {}, True),
    ("app", {"app": ""}, True),
    ("!app", {"app": "x"}, False),
    ("app in (a,b),!gone,tier", {"app": "b", "tier": "x"}, True),
])
def test_label_selectors(selector, labels, matches):
    assert LabelSelector.parse(selector).matches(labels) is matches


@pytest.mark.parametrize("selector", ["a b", "app in web", "=x", "app=(x)"])
def test_bad_label_selectors_are_bad_requests(selector):
    with pytest.raises(StatusError) as raised:
        LabelSelector.parse(selector)
    assert raised.value.code == 400


def test_field_selectors():
    selector = FieldSelector.parse("metadata.name=a,status.phase!=Failed", ("metadata.name", "status.phase"))
    assert selector.matches({"metadata": {"name": "a"}, "status": {"phase": "Running"}})
    assert not selector.matches({"metadata": {"name": "a"}, "status": {"phase": "Failed"}})
    with pytest.raises(StatusError, match="field label not supported: spec.x"):
        FieldSelector.parse("spec.x=1", ("metadata.name",))


def test_strategic_merge_patch_merges_named_lists_and_drops_directives():
    current = {"spec": {"containers": [{"name": "a", "image": "1", "ports": [{"containerPort": 80}]},
                                       {"name": "b", "image": "1"}]}}
    patch = {"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
                      "containers": [{"name": "a", "image": "2"}, {"name": "c", "$patch": "delete"}]}}
    assert apply_patch(STRATEGIC_MERGE_PATCH, current, patch) == {"spec": {"containers": [
        {"name": "b", "image": "1"}, {"name": "a", "image": "2", "ports": [{"containerPort": 80}]}]}}
    removal = {"spec": {"containers": [{"name": "b", "$patch": "delete"}]}}
    assert [c["name"] for c in apply_patch(STRATEGIC_MERGE_PATCH, current, removal)["spec"]["containers"]] == ["a"]


def test_merge_patch_replaces_lists_and_removes_nulls():
    assert apply_patch(MERGE_PATCH, {"a": [1, 2], "b": {"c": 1, "d": 2}}, {"a": [3], "b": {"c": None}}) == \
        {"a": [3], "b": {"d": 2}}


def test_json_patch_operations_and_refusals():
    doc = {"spec": {"groups": ["a", "b"], "email": "x@example.com"}}
    ops = [{"op": "add", "path": "/spec/groups/-", "value": "c"}, {"op": "remove", "path": "/spec/email"},
           {"op": "test", "path": "/spec/groups/0", "value": "a"}, {"op": "replace", "path": "/spec/groups/1", "value": "B"}]
    assert apply_patch(JSON_PATCH, doc, ops) == {"spec": {"groups": ["a", "B", "c"]}}
    assert doc == {"spec": {"groups": ["a", "b"], "email": "x@example.com"}}  # the target is not changed
    with pytest.raises(StatusError) as failed:
        apply_patch(JSON_PATCH, doc, [{"op": "test", "path": "/spec/email", "value": "y"}])
    assert failed.value.code == 422
    with pytest.raises(StatusError) as missing:
        apply_patch(JSON_PATCH, doc, [{"op": "remove", "path": "/spec/nothing"}])
    assert missing.value.code == 422
    with pytest.raises(StatusError) as shape:
        apply_patch(JSON_PATCH, doc, {"op": "add"})
    assert shape.value.code == 400
    with pytest.raises(StatusError) as media:
        apply_patch("application/apply-patch+yaml", doc, {})
    assert media.value.code == 415
