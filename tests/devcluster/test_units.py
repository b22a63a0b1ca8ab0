"""The devcluster's parsing and policy pieces, without a process."""
from __future__ import annotations

import pytest

from devcluster import protobuf
from devcluster.auth import Attributes, Authorizer, Rule, authenticated, request_attributes
from devcluster.errors import ApiError
from devcluster.patch import MERGE_PATCH, STRATEGIC_MERGE_PATCH, apply_patch
from devcluster.selectors import FieldSelector, LabelSelector
from devcluster.tables import human_duration, wants_table


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
    with pytest.raises(ApiError) as raised:
        LabelSelector.parse(selector)
    assert raised.value.code == 400


def test_field_selectors():
    selector = FieldSelector.parse("metadata.name=a,status.phase!=Failed", ("metadata.name", "status.phase"))
    assert selector.matches({"metadata": {"name": "a"}, "status": {"phase": "Running"}})
    assert not selector.matches({"metadata": {"name": "a"}, "status": {"phase": "Failed"}})
    with pytest.raises(ApiError, match="field label not supported: spec.x"):
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


@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("GET", "/api/v1/namespaces/ns/pods", {}, ("list", "", "pods", "", "ns", "")),
    ("GET", "/api/v1/pods", {"watch": "true"}, ("watch", "", "pods", "", "", "")),
    ("GET", "/api/v1/namespaces/ns/pods", {"watch": "0"}, ("list", "", "pods", "", "ns", "")),
    ("GET", "/api/v1/watch/namespaces/ns/pods/p", {}, ("watch", "", "pods", "", "ns", "p")),
    ("DELETE", "/apis/apps/v1/namespaces/ns/deployments", {}, ("deletecollection", "apps", "deployments", "", "ns", "")),
    ("POST", "/api/v1/namespaces/ns/pods/p/exec", {}, ("create", "", "pods", "exec", "ns", "p")),
    ("GET", "/api/v1/namespaces/ns", {}, ("get", "", "namespaces", "", "ns", "ns")),
    ("GET", "/api/v1/namespaces", {"fieldSelector": "metadata.name=x"}, ("list", "", "namespaces", "", "", "x")),
])
def test_request_attributes(method, path, query, expected):
    attrs = request_attributes(method, path, query)
    assert attrs.is_resource
    assert (attrs.verb, attrs.api_group, attrs.resource, attrs.subresource, attrs.namespace, attrs.name) == expected


def test_non_resource_attributes():
    assert request_attributes("GET", "/apis/apps", {}) == Attributes(verb="get", path="/apis/apps")


def test_rules_cover_subresources_namespaces_and_builtin_policy():
    authorizer = Authorizer([Rule.from_json({"groups": ["dev"], "verbs": ["get"], "resources": ["pods/*"],
                                             "namespaces": ["team-a"]})])
    dev = authenticated("dev-user", ["dev"])
    logs = Attributes(verb="get", is_resource=True, resource="pods", subresource="log", namespace="team-a")
    assert authorizer.allows(dev, logs)
    assert not authorizer.allows(dev, Attributes(verb="get", is_resource=True, resource="pods", namespace="team-a"))
    assert not authorizer.allows(dev, Attributes(verb="get", is_resource=True, resource="pods", subresource="log",
                                                 namespace="team-b"))
    assert authorizer.allows(dev, Attributes(verb="get", path="/apis"))
    assert authorizer.allows(authenticated("root", ["system:masters"]),
                             Attributes(verb="delete", is_resource=True, resource="anything"))


def test_protobuf_create_body_decodes_to_json_shape():
    # What `kubectl create configmap c --from-literal=a=b -n ns` sends.
    def field(number, payload: bytes) -> bytes:
        return bytes([number << 3 | 2, len(payload)]) + payload

    metadata = field(1, b"c") + field(3, b"ns") + field(2, b"")
    raw = field(1, metadata) + field(2, field(1, b"a") + field(2, b"b"))
    body = b"k8s\x00" + field(1, field(1, b"v1") + field(2, b"ConfigMap")) + field(2, raw)
    assert protobuf.decode(body) == {"kind": "ConfigMap", "apiVersion": "v1",
                                     "metadata": {"name": "c", "namespace": "ns"}, "data": {"a": "b"}}
    with pytest.raises(ApiError) as raised:
        protobuf.decode(b"k8s\x00" + field(1, field(1, b"v1") + field(2, b"Pod")))
    assert raised.value.code == 415


def test_table_negotiation_and_ages():
    assert wants_table("application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
    assert not wants_table("application/json")
    assert ([human_duration(s) for s in (5, 150, 900, 7300, 14460, 86400 * 3 + 3600)]
            == ["5s", "2m30s", "15m", "121m", "4h1m", "3d1h"])
