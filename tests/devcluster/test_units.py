"""The devcluster's parsing and policy pieces, without a process."""
from __future__ import annotations

from pathlib import Path

import pytest

from devcluster import protobuf
from devcluster.auth import Attributes, Authorizer, Rule, authenticated, request_attributes
from devcluster.errors import ApiError
from devcluster.services import backend_path, is_service_proxy, parse_service_map, service_name
from devcluster.tables import human_duration, wants_table


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


def test_service_proxy_paths():
    path = "/api/v1/namespaces/ns/services/https:vc1:443/proxy/api/v1/pods"
    attrs = request_attributes("GET", path, {})
    assert is_service_proxy(attrs) and service_name(attrs.name) == "vc1"
    assert backend_path(path, attrs) == "/api/v1/pods"
    bare = "/api/v1/namespaces/ns/services/vc1/proxy"
    assert backend_path(bare, request_attributes("GET", bare, {})) == "/"
    assert service_name("vc1:8443") == "vc1"
    assert not is_service_proxy(request_attributes("GET", "/api/v1/namespaces/ns/services/vc1", {}))
    assert not is_service_proxy(request_attributes("GET", "/apis/x.io/v1/namespaces/ns/services/vc1/proxy", {}))


def test_service_map_options():
    assert parse_service_map(["ns/vc1=/tmp/a", "ns/vc2=b"]) == {("ns", "vc1"): Path("/tmp/a"), ("ns", "vc2"): Path("b")}
    for bad in ("ns/vc1", "vc1=/tmp/a", "/vc1=/a", "ns/=/a", "ns/vc1="):
        with pytest.raises(ValueError, match="--service must be NAMESPACE/NAME=DIR"):
            parse_service_map([bad])
