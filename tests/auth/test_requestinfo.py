"""request_info against the API server's reading of requests, field by field."""
from __future__ import annotations

import itertools
import random

import pytest

from fastproxy.auth.requestinfo import RequestInfo, RequestTarget, request_info, request_verb

# (method, path, query) -> (verb, api_group, namespace, resource, subresource, name)
RESOURCE_CASES = [
    ("GET", "/api/v1/namespaces/ns/pods/p", "", ("get", "", "ns", "pods", "", "p")),
    ("HEAD", "/api/v1/namespaces/ns/pods/p", "", ("get", "", "ns", "pods", "", "p")),
    ("GET", "/api/v1/namespaces/ns/pods", "", ("list", "", "ns", "pods", "", "")),
    ("GET", "/api/v1/pods", "limit=500", ("list", "", "", "pods", "", "")),
    ("GET", "/api/v1/namespaces/ns/pods/", "", ("list", "", "ns", "pods", "", "")),
    ("POST", "/api/v1/namespaces/ns/pods", "", ("create", "", "ns", "pods", "", "")),
    ("PUT", "/api/v1/namespaces/ns/pods/p", "", ("update", "", "ns", "pods", "", "p")),
    ("PATCH", "/api/v1/namespaces/ns/pods/p", "", ("patch", "", "ns", "pods", "", "p")),
    ("DELETE", "/api/v1/namespaces/ns/pods/p", "", ("delete", "", "ns", "pods", "", "p")),
    ("DELETE", "/api/v1/namespaces/ns/pods", "", ("deletecollection", "", "ns", "pods", "", "")),
    ("OPTIONS", "/api/v1/namespaces/ns/pods", "", ("", "", "ns", "pods", "", "")),
    ("GET", "/apis/apps/v1/namespaces/ns/deployments/d/scale", "", ("get", "apps", "ns", "deployments", "scale", "d")),
    ("GET", "/api/v1/nodes/n1", "", ("get", "", "", "nodes", "", "n1")),
    ("GET", "/api/v1/namespaces", "", ("list", "", "", "namespaces", "", "")),
    ("GET", "/api/v1/namespaces/ns", "", ("get", "", "ns", "namespaces", "", "ns")),
    ("GET", "/api/v1/namespaces/ns/status", "", ("get", "", "ns", "namespaces", "status", "ns")),
    ("PUT", "/api/v1/namespaces/ns/finalize", "", ("update", "", "ns", "namespaces", "finalize", "ns")),
    # exec: a WebSocket GET (kubectl >= 1.30) or a SPDY POST, both pods/exec
    ("GET", "/api/v1/namespaces/ns/pods/p/exec", "command=ls&stdout=true", ("get", "", "ns", "pods", "exec", "p")),
    ("POST", "/api/v1/namespaces/ns/pods/p/exec", "command=ls", ("create", "", "ns", "pods", "exec", "p")),
    # only the third part is the subresource; the rest is the subresource's own path
    ("GET", "/api/v1/namespaces/ns/services/s/proxy/a/b", "", ("get", "", "ns", "services", "proxy", "s")),
    # legacy path verbs
    ("GET", "/api/v1/watch/namespaces/ns/pods", "", ("watch", "", "ns", "pods", "", "")),
    ("GET", "/api/v1/watch/namespaces/ns/pods/p", "", ("watch", "", "ns", "pods", "", "p")),
    ("GET", "/api/v1/watch/pods", "", ("watch", "", "", "pods", "", "")),
    ("GET", "/api/v1/proxy/namespaces/ns/pods/p/a/b", "", ("proxy", "", "ns", "pods", "", "p")),
    ("GET", "/api/v1/proxy/nodes/n1/stats", "", ("proxy", "", "", "nodes", "", "n1")),
]


@pytest.mark.parametrize("method, path, query, expected", RESOURCE_CASES)
def test_resource_requests(method, path, query, expected):
    info = request_info(method, path, query)
    assert info.is_resource_request
    assert info.path == path
    assert (info.verb, info.api_group, info.namespace, info.resource, info.subresource, info.name) == expected


def test_all_fields_of_a_grouped_request():
    assert request_info("GET", "/apis/apps/v1/namespaces/ns/deployments/d/scale", "") == RequestInfo(
        is_resource_request=True, path="/apis/apps/v1/namespaces/ns/deployments/d/scale", verb="get",
        api_prefix="apis", api_group="apps", api_version="v1", namespace="ns", resource="deployments",
        subresource="scale", name="d", parts=("deployments", "d", "scale"))


def test_core_group_fields():
    info = request_info("GET", "/api/v1/namespaces/ns/pods/p/log", "")
    assert (info.api_prefix, info.api_group, info.api_version, info.parts) == ("api", "", "v1", ("pods", "p", "log"))


@pytest.mark.parametrize("query, verb", [
    ("watch=1", "watch"), ("watch=true", "watch"), ("watch=yes", "watch"), ("watch=", "watch"),
    ("watch", "watch"), ("watch=0", "list"), ("watch=false", "list"), ("watch=FALSE", "list"),
    ("watch=0&watch=1", "list"),  # the first value counts
    ("resourceVersion=1&watch=1&allowWatchBookmarks=true", "watch"),
    ("w%61tch=1", "watch"),       # an escaped key is still the watch parameter
    ("watchx=1", "list"), ("xwatch=1", "list"), ("labelSelector=watch%3D1", "list"),
])
def test_watch_parameter(query, verb):
    assert request_info("GET", "/api/v1/namespaces/ns/pods", query).verb == verb


@pytest.mark.parametrize("query, name", [
    ("fieldSelector=metadata.name%3Dfoo", "foo"),
    ("fieldSelector=metadata.name%3D%3Dfoo", "foo"),
    ("fieldSelector=metadata.name=foo", "foo"),
    ("fieldSelector=metadata.namespace%3Dns%2Cmetadata.name%3Dfoo", "foo"),
    ("fieldSelector=metadata.name%3Da%5C%2Cb", "a,b"),      # escaped comma
    ("fieldSelector=metadata.name%21%3Dfoo", ""),           # != gives no name
    ("fieldSelector=metadata.name%3Dfoo%2Fbar", ""),        # not one path segment
    ("fieldSelector=metadata.name%3D..", ""),
    ("fieldSelector=metadata.name%3Da%5Cx", ""),            # invalid escape: selector ignored
    ("fieldSelector=metadata.name%3Dfoo%2Cbroken", ""),     # a term without operator: ignored
    ("fieldSelector=spec.nodeName%3Dn1", ""),
    ("fieldSelector=metadata.name%3Dfoo&watch=1", "foo"),
])
def test_field_selector_name(query, name):
    info = request_info("GET", "/api/v1/namespaces/ns/pods", query)
    assert info.name == name
    assert info.verb == ("watch" if "watch=1" in query else "list")


def test_field_selector_does_not_name_other_verbs():
    assert request_info("DELETE", "/api/v1/namespaces/ns/pods", "fieldSelector=metadata.name%3Dfoo").name == ""


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/version"), ("GET", "/healthz"), ("GET", "/api"), ("GET", "/api/v1"),
    ("GET", "/apis"), ("GET", "/apis/apps"), ("GET", "/apis/apps/v1"), ("GET", "/openapi/v2"),
    ("POST", "/apis"), ("HEAD", "/metrics"), ("GET", "/logs/a/b/c"),
])
def test_non_resource_requests(method, path):
    assert request_info(method, path, "watch=1") == RequestInfo(False, path, method.lower())


def test_path_verb_without_a_resource_is_a_resource_request_with_nothing_known():
    assert request_info("GET", "/api/v1/watch", "") == RequestInfo(True, "/api/v1/watch", "get", "api", "", "v1")


SEGMENTS = ("api", "apis", "v1", "apps", "namespaces", "ns", "status", "finalize", "watch", "proxy", "pods", "log")
QUERIES = ("", "watch=1", "watch=false", "limit=5", "fieldSelector=metadata.name%3Dweb", "w%61tch=1")


def paths():
    for length in range(5):
        for segments in itertools.product(SEGMENTS, repeat=length):
            yield "/" + "/".join(segments)
    rng = random.Random(7)
    for _ in range(3000):
        yield "/" + "/".join(rng.choice(SEGMENTS) for _ in range(rng.randint(5, 8)))


def test_request_verb_is_request_infos_verb():
    checked = 0
    for path in paths():
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
            for query in QUERIES if method == "GET" else ("",):
                for variant in (path, path + "/") if path != "/" else (path,):
                    assert request_verb(method, variant, query) == request_info(method, variant, query).verb, (
                        method, variant, query)
                    checked += 1
    assert checked > 200_000


def test_request_targets_are_the_loft_names():
    assert [target.value for target in RequestTarget] == [
        "Management", "Cluster", "VirtualCluster", "ProjectSpace", "ProjectVirtualCluster"]
    assert RequestTarget.Cluster == "Cluster"


def test_request_info_is_immutable():
    info = request_info("GET", "/api/v1/pods", "")
    with pytest.raises(AttributeError):
        info.verb = "create"  # type: ignore[misc]
