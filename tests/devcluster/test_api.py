"""The devcluster's HTTP API conventions, checked with plain HTTPS requests and the official
Python client."""
from __future__ import annotations

import threading

import pytest
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def namespace(api):
    """A namespace of this module's own, so the seeded ones stay as seeded."""
    status, _ = api.request("POST", "/api/v1/namespaces", {"metadata": {"name": "api-test"}})
    assert status == 201
    yield "api-test"
    api.request("DELETE", "/api/v1/namespaces/api-test")


def configmaps(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps"


def create_configmap(api, namespace, name, data=None, labels=None):
    status, body = api.request("POST", configmaps(namespace), {
        "metadata": {"name": name, "labels": labels or {}}, "data": data or {}})
    assert status == 201, body
    return body


def test_errors_are_status_objects(api, namespace):
    assert api.request("GET", f"{configmaps(namespace)}/missing") == (404, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'configmaps "missing" not found', "reason": "NotFound",
        "details": {"name": "missing", "group": "", "kind": "configmaps"}, "code": 404})
    create_configmap(api, namespace, "twice")
    status, body = api.request("POST", configmaps(namespace), {"metadata": {"name": "twice"}})
    assert (status, body["reason"], body["message"]) == (409, "AlreadyExists", 'configmaps "twice" already exists')
    status, body = api.request("POST", configmaps("no-such-namespace"), {"metadata": {"name": "x"}})
    assert (status, body["message"]) == (404, 'namespaces "no-such-namespace" not found')
    status, body = api.request("PUT", configmaps(namespace), {"metadata": {"name": "x"}})
    assert (status, body["reason"]) == (405, "MethodNotAllowed")
    status, body = api.request("POST", configmaps(namespace), b"{not json")
    assert (status, body["reason"]) == (400, "BadRequest")
    status, body = api.request("POST", configmaps(namespace), {"metadata": {"name": "Not_Valid"}})
    assert (status, body["reason"]) == (422, "Invalid")
    status, body = api.request("GET", "/api/v1/widgets")
    assert (status, body["message"]) == (404, "the server could not find the requested resource")


def test_unauthenticated_requests_are_refused(api):
    assert api.request("GET", "/api/v1/namespaces", token=None) == (401, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    assert api.request("GET", "/version", token="wrong")[0] == 401


def test_create_defaults_metadata(api, namespace):
    before = int(api.request("GET", configmaps(namespace))[1]["metadata"]["resourceVersion"])
    created = create_configmap(api, namespace, "defaults")
    meta = created["metadata"]
    assert (created["kind"], created["apiVersion"], meta["namespace"]) == ("ConfigMap", "v1", namespace)
    assert int(meta["resourceVersion"]) > before and len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z")
    status, generated = api.request("POST", configmaps(namespace), {"metadata": {"generateName": "gen-"}})
    assert status == 201 and generated["metadata"]["name"].startswith("gen-")
    assert len(generated["metadata"]["name"]) == len("gen-") + 5


def test_stale_update_is_a_conflict(api, namespace):
    original = create_configmap(api, namespace, "versioned", {"v": "1"})
    first = dict(original, data={"v": "2"})
    status, updated = api.request("PUT", f"{configmaps(namespace)}/versioned", first)
    assert status == 200 and updated["data"] == {"v": "2"}
    assert int(updated["metadata"]["resourceVersion"]) > int(original["metadata"]["resourceVersion"])
    stale = dict(original, data={"v": "3"})
    assert api.request("PUT", f"{configmaps(namespace)}/versioned", stale) == (409, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'Operation cannot be fulfilled on configmaps "versioned": the object has been '
                   "modified; please apply your changes to the latest version and try again",
        "reason": "Conflict", "details": {"name": "versioned", "group": "", "kind": "configmaps"},
        "code": 409})


def test_patch_types(api, namespace):
    create_configmap(api, namespace, "patched", {"a": "1", "b": "2"})
    path = f"{configmaps(namespace)}/patched"
    status, merged = api.request("PATCH", path, {"data": {"a": None, "c": "3"}},
                                 headers={"Content-Type": "application/merge-patch+json"})
    assert (status, merged["data"]) == (200, {"b": "2", "c": "3"})
    status, patched = api.request("PATCH", path, [{"op": "replace", "path": "/data/b", "value": "20"},
                                                  {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}],
                                  headers={"Content-Type": "application/json-patch+json"})
    assert (status, patched["data"], patched["metadata"]["labels"]) == (200, {"b": "20", "c": "3"}, {"x": "y"})
    status, body = api.request("PATCH", path, b"data: {}", headers={"Content-Type": "application/apply-patch+yaml"})
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")


def test_list_pages_with_limit_and_continue(api, namespace):
    for name in ("page-a", "page-b", "page-c"):
        create_configmap(api, namespace, name, labels={"paged": "yes"})
    query = f"{configmaps(namespace)}?labelSelector=paged%3Dyes&limit=2"
    status, first = api.request("GET", query)
    assert status == 200 and first["kind"] == "ConfigMapList"
    assert [item["metadata"]["name"] for item in first["items"]] == ["page-a", "page-b"]
    assert first["metadata"]["remainingItemCount"] == 1
    status, second = api.request("GET", f"{query}&continue={first['metadata']['continue']}")
    assert [item["metadata"]["name"] for item in second["items"]] == ["page-c"]
    assert "continue" not in second["metadata"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    status, body = api.request("GET", f"{query}&continue=garbage")
    assert (status, body["reason"]) == (400, "BadRequest")


def test_watch_resumes_from_a_version_with_selectors(api, namespace):
    rv = api.request("GET", configmaps(namespace))[1]["metadata"]["resourceVersion"]
    create_configmap(api, namespace, "watch-other")
    create_configmap(api, namespace, "watch-me", labels={"watched": "yes"})
    api.request("DELETE", f"{configmaps(namespace)}/watch-me")
    stream = api.watch(f"{configmaps(namespace)}?watch=true&resourceVersion={rv}&labelSelector=watched%3Dyes"
                       "&timeoutSeconds=1")
    try:
        assert stream.response.status == 200
        events = [stream.next_event(), stream.next_event()]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == \
            [("ADDED", "watch-me"), ("DELETED", "watch-me")]
        assert stream.next_event() is None  # timeoutSeconds ends the stream
    finally:
        stream.close()


def test_watch_without_version_starts_with_current_objects(api):
    stream = api.watch("/api/v1/namespaces/team-a/pods?watch=1&timeoutSeconds=1")
    try:
        names = [stream.next_event()["object"]["metadata"]["name"] for _ in range(2)]
        assert names == ["web-5d4f8c7b9-h7k2m", "web-5d4f8c7b9-q9w4z"]
    finally:
        stream.close()


def test_watch_bookmarks(api, namespace):
    rv = api.request("GET", configmaps(namespace))[1]["metadata"]["resourceVersion"]
    stream = api.watch(f"{configmaps(namespace)}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true"
                       "&timeoutSeconds=3&labelSelector=nothing%3Dmatches")
    try:
        event = stream.next_event()
        assert event["type"] == "BOOKMARK" and event["object"]["kind"] == "ConfigMap"
        assert int(event["object"]["metadata"]["resourceVersion"]) > 0
    finally:
        stream.close()


def test_table_for_kubectl_get(api):
    status, table = api.request("GET", "/api/v1/namespaces/team-b/pods",
                                headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"})
    assert (status, table["kind"], table["apiVersion"]) == (200, "Table", "meta.k8s.io/v1")
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Ready", "Status", "Restarts", "Age",
                                                                "IP", "Node"]
    [row] = table["rows"]
    assert row["cells"][:4] == ["api-0", "2/2", "Running", 0]
    assert row["object"]["kind"] == "PartialObjectMetadata"


def test_discovery_documents(api):
    status, core = api.request("GET", "/api/v1")
    assert status == 200 and core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods"]["shortNames"] == ["po"] and by_name["pods"]["namespaced"] is True
    assert by_name["namespaces"]["namespaced"] is False
    assert by_name["pods/exec"]["verbs"] == ["create", "get"]
    assert by_name["pods/log"]["verbs"] == ["get"]
    status, groups = api.request("GET", "/apis")
    assert [g["name"] for g in groups["groups"]] == ["apps", "authentication.k8s.io", "authorization.k8s.io"]
    assert api.request("GET", "/version")[1]["gitVersion"] == "v1.32.0"


def test_subject_access_review_for_the_gateway(api, cluster, bob_token):
    def review(user, groups, attributes):
        status, body = api.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, "resourceAttributes": attributes}},
            token=cluster.gateway_token)
        assert status == 201, body
        return body["status"]["allowed"]

    impersonate_alice = {"verb": "impersonate", "resource": "users", "name": "alice"}
    assert review("fastproxy-gateway", ["system:authenticated"], impersonate_alice) is True
    assert review("bob", ["system:authenticated"], impersonate_alice) is False
    assert review("bob", [], {"verb": "list", "resource": "pods", "namespace": "team-a"}) is True
    assert review("bob", [], {"verb": "list", "resource": "pods", "namespace": "team-b"}) is False
    # The rule a host cluster holds for who may use the virtual clusters of a namespace.
    vcluster = {"verb": "get", "group": "storage.loft.sh", "resource": "virtualclusters", "namespace": "vcluster-a",
                "name": "vc1"}
    assert review("bob", [], vcluster) is True
    assert review("bob", [], {**vcluster, "namespace": "vcluster-b"}) is False
    assert review("bob", [], {**vcluster, "verb": "delete"}) is False
    assert review("bob", [], {**vcluster, "group": "management.loft.sh"}) is False
    status, answered = api.request("GET", "/devcluster/subjectaccessreviews")
    assert status == 200 and answered[-1] == {"user": "bob", "groups": [],
                                              "resourceAttributes": {**vcluster, "group": "management.loft.sh"}}
    assert api.request("GET", "/devcluster/subjectaccessreviews", token=bob_token)[0] == 403


def test_the_service_proxy_is_for_the_gateway_and_known_services(api, cluster, bob_token):
    path = "/api/v1/namespaces/vcluster-a/services/https:vc1:443/proxy/api/v1/namespaces"
    status, body = api.request("GET", path, token=bob_token)
    assert status == 403 and 'cannot get resource "services/proxy"' in body["message"]
    status, body = api.request("GET", path, token=cluster.gateway_token)
    assert status == 404 and body["message"] == 'services "vc1" not found'


def test_gateway_impersonates_with_token_and_client_certificate(api, cluster):
    whoami = "/apis/authentication.k8s.io/v1/selfsubjectreviews"
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    status, body = api.request("POST", whoami, review, token=cluster.gateway_token,
                               headers={"Impersonate-User": "bob", "Impersonate-Group": "dev",
                                        "Impersonate-Extra-Scopes": "view"})
    assert status == 201
    assert body["status"]["userInfo"] == {"username": "bob", "groups": ["dev", "system:authenticated"],
                                          "extra": {"scopes": ["view"]}}
    status, body = api.request("GET", "/api/v1/namespaces/team-b/pods", token=cluster.gateway_token,
                               headers={"Impersonate-User": "bob"})
    assert (status, body["message"]) == (403, 'pods is forbidden: User "bob" cannot list resource "pods" in '
                                              'API group "" in the namespace "team-b"')

    conn = api.connection(client_cert=(cluster.gateway_cert_file, cluster.gateway_key_file))
    try:
        conn.request("POST", whoami, body=b"{}", headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 201
        assert b'"username":"fastproxy-gateway"' in response.read()
    finally:
        conn.close()


def test_python_client_watch(cluster, namespace):
    configuration = k8s.Configuration(host=cluster.url, api_key={"authorization": f"Bearer {cluster.admin_token}"})
    configuration.ssl_ca_cert = str(cluster.ca_file)
    with k8s.ApiClient(configuration) as api_client:
        core = k8s.CoreV1Api(api_client)
        version = core.list_namespaced_config_map(namespace).metadata.resource_version
        events = []
        watcher = k8s_watch.Watch()

        def consume():
            for event in watcher.stream(core.list_namespaced_config_map, namespace,
                                        resource_version=version, timeout_seconds=5):
                events.append((event["type"], event["object"].metadata.name))
                watcher.stop()

        reader = threading.Thread(target=consume)
        reader.start()
        core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="from-python")))
        reader.join(5)
        assert events == [("ADDED", "from-python")]


def test_pod_subresources_are_authorised_and_need_the_pod(api, bob_token):
    status, body = api.request("POST", "/api/v1/namespaces/default/pods/missing/exec?command=ls")
    assert (status, body["message"]) == (404, 'pods "missing" not found')
    status, body = api.request("POST", "/api/v1/namespaces/team-a/pods/web-5d4f8c7b9-h7k2m/exec?command=ls",
                               token=bob_token)
    assert (status, body["message"]) == (403, 'pods "web-5d4f8c7b9-h7k2m" is forbidden: User "bob" cannot '
                                              'create resource "pods/exec" in API group "" in the namespace "team-a"')
    status, body = api.request("PUT", "/api/v1/namespaces/default/pods/hello/exec")
    assert (status, body["reason"]) == (405, "MethodNotAllowed")
    status, text = api.request("GET", "/api/v1/namespaces/team-a/pods/web-5d4f8c7b9-h7k2m/log?tailLines=1",
                               token=bob_token)
    assert (status, text) == (200, "web-5d4f8c7b9-h7k2m/nginx: log line 10\n")
