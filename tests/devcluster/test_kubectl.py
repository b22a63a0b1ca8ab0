"""The real kubectl against a devcluster process."""
from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.e2e

SEEDED_PODS = [
    ["default", "hello", "1/1", "Running", "0"],
    ["kube-system", "coredns-7db6d8ff4d-x2kfp", "1/1", "Running", "0"],
    ["team-a", "web-5d4f8c7b9-h7k2m", "1/1", "Running", "0"],
    ["team-a", "web-5d4f8c7b9-q9w4z", "1/1", "Running", "0"],
    ["team-b", "api-0", "2/2", "Running", "0"],
]


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.strip().splitlines()]


def test_get_namespaces_prints_a_table(kubectl):
    table = rows(kubectl("get", "namespaces").stdout)
    assert table[0] == ["NAME", "STATUS", "AGE"]
    seeded = [row[:2] for row in table[1:] if row[0] in ("default", "kube-system", "team-a", "team-b")]
    assert seeded == [["default", "Active"], ["kube-system", "Active"], ["team-a", "Active"],
                      ["team-b", "Active"]]


def test_get_pods_in_all_namespaces(kubectl):
    table = rows(kubectl("get", "pods", "-A").stdout)
    assert table[0] == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert [row[:5] for row in table[1:] if row[1] in {p[1] for p in SEEDED_PODS}] == SEEDED_PODS


def test_get_pods_as_json(kubectl):
    listing = json.loads(kubectl("get", "pods", "-n", "team-b", "-o", "json").stdout)
    assert listing["kind"] == "List"
    [pod] = listing["items"]
    assert (pod["kind"], pod["metadata"]["name"], pod["status"]["phase"], pod["spec"]["nodeName"]) == \
        ("Pod", "api-0", "Running", "devcluster-node-1")
    assert [c["name"] for c in pod["spec"]["containers"]] == ["api", "metrics"]


def test_short_names_and_wide_output(kubectl):
    assert kubectl("get", "deploy", "-n", "team-a", "-o", "name").stdout == "deployment.apps/web\n"
    table = rows(kubectl("get", "po", "hello", "-o", "wide").stdout)
    assert table[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert table[1][-1] == "devcluster-node-1"


def test_create_apply_and_delete(kubectl, tmp_path):
    assert kubectl("create", "namespace", "apply-test").stdout == "namespace/apply-test created\n"
    assert kubectl("create", "configmap", "literal", "-n", "apply-test", "--from-literal=a=b").stdout == \
        "configmap/literal created\n"
    manifest = tmp_path / "settings.json"

    def write(data):
        manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                                        "metadata": {"name": "settings", "namespace": "apply-test"},
                                        "data": data}))

    write({"mode": "one"})
    assert kubectl("apply", "-f", str(manifest)).stdout == "configmap/settings created\n"
    write({"mode": "two", "extra": "yes"})
    assert kubectl("apply", "-f", str(manifest)).stdout == "configmap/settings configured\n"
    assert kubectl("apply", "-f", str(manifest)).stdout == "configmap/settings unchanged\n"
    stored = json.loads(kubectl("get", "configmap", "settings", "-n", "apply-test", "-o", "json").stdout)
    assert stored["data"] == {"mode": "two", "extra": "yes"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in stored["metadata"]["annotations"]

    assert kubectl("delete", "configmap", "settings", "-n", "apply-test").stdout == \
        'configmap "settings" deleted\n'
    missing = kubectl("get", "configmap", "settings", "-n", "apply-test", check=False)
    assert (missing.returncode, missing.stderr) == \
        (1, 'Error from server (NotFound): configmaps "settings" not found\n')
    assert kubectl("delete", "namespace", "apply-test").stdout == 'namespace "apply-test" deleted\n'
    # Deleting the namespace deleted what was in it; kubectl names the missing namespace.
    gone = kubectl("get", "configmap", "literal", "-n", "apply-test", check=False)
    assert gone.stderr == 'Error from server (NotFound): namespaces "apply-test" not found\n'


def test_apply_merges_containers_by_name(kubectl, tmp_path):
    kubectl("create", "namespace", "apply-deploy")
    manifest = tmp_path / "deploy.json"

    def write(containers):
        manifest.write_text(json.dumps({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "app", "namespace": "apply-deploy"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                     "template": {"metadata": {"labels": {"app": "app"}},
                                  "spec": {"containers": containers}}}}))

    write([{"name": "main", "image": "nginx:1.27", "ports": [{"containerPort": 80}]},
           {"name": "sidecar", "image": "busybox"}])
    kubectl("apply", "-f", str(manifest))
    write([{"name": "main", "image": "nginx:1.28", "ports": [{"containerPort": 80}]}])
    assert kubectl("apply", "-f", str(manifest)).stdout == "deployment.apps/app configured\n"
    containers = json.loads(kubectl("get", "deploy", "app", "-n", "apply-deploy", "-o",
                                    "jsonpath={.spec.template.spec.containers}").stdout)
    assert containers == [{"name": "main", "image": "nginx:1.28", "ports": [{"containerPort": 80}]}]
    kubectl("delete", "namespace", "apply-deploy")


def test_watch_sees_a_change_made_by_another_client(kubectl, api):
    kubectl("create", "namespace", "watch-test")
    watch = kubectl.background("get", "configmaps", "-n", "watch-test", "-w", "--output-watch-events")
    try:
        time.sleep(0.5)  # let kubectl list and open its watch
        status, _ = api.request("POST", "/api/v1/namespaces/watch-test/configmaps",
                                {"metadata": {"name": "seen"}, "data": {"k": "v"}})
        assert status == 201
        created = time.monotonic()
        lines = watch.lines(2, timeout=1.5)
        assert rows("\n".join(lines))[:2] == [["EVENT", "NAME", "DATA", "AGE"], ["ADDED", "seen", "1", "0s"]]
        assert time.monotonic() - created < 1.0
    finally:
        watch.stop()
        kubectl("delete", "namespace", "watch-test")


def test_logs(kubectl):
    expected = "".join(f"hello/hello: log line {n}\n" for n in range(1, 11))
    assert kubectl("logs", "hello").stdout == expected
    assert kubectl("logs", "api-0", "-n", "team-b", "-c", "metrics", "--tail=2").stdout == \
        "api-0/metrics: log line 9\napi-0/metrics: log line 10\n"


def test_logs_follow_streams_new_lines(kubectl):
    follow = kubectl.background("logs", "-f", "hello", "--tail=1")
    try:
        assert follow.lines(2, timeout=3) == ["hello/hello: log line 10", "hello/hello: log line 11"]
    finally:
        follow.stop()


def test_whoami_with_impersonation_by_admin(kubectl):
    plain = kubectl("auth", "whoami").stdout
    assert rows(plain) == [["ATTRIBUTE", "VALUE"], ["Username", "admin"],
                           ["Groups", "[system:masters", "system:authenticated]"]]
    review = json.loads(kubectl("auth", "whoami", "--as", "alice", "--as-group", "devs",
                                "--as-group", "ops", "-o", "json").stdout)
    assert review["status"]["userInfo"] == {"username": "alice",
                                            "groups": ["devs", "ops", "system:authenticated"]}


def test_impersonation_refused_without_the_right(kubectl):
    assert rows(kubectl("auth", "whoami", user="carol").stdout)[1] == ["Username", "carol"]
    refused = kubectl("auth", "whoami", "--as", "alice", user="carol", check=False)
    # kubectl words any Forbidden answer to a SelfSubjectReview itself...
    assert (refused.returncode, refused.stderr) == (
        1, "error: the selfsubjectreviews API is not enabled in the cluster or you do not have "
           "permission to call it\n")
    # ...so the server's reason shows on another request.
    refused = kubectl("get", "pods", "--as", "alice", user="carol", check=False)
    assert (refused.returncode, refused.stderr) == (1, 'Error from server (Forbidden): users "alice" is '
                                                       'forbidden: User "carol" cannot impersonate resource '
                                                       '"users" in API group "" at the cluster scope\n')


def test_restricted_user(kubectl):
    allowed = rows(kubectl("get", "pods", "-n", "team-a", user="bob").stdout)
    assert [row[0] for row in allowed[1:]] == ["web-5d4f8c7b9-h7k2m", "web-5d4f8c7b9-q9w4z"]
    denied = kubectl("get", "pods", "-n", "team-b", user="bob", check=False)
    assert (denied.returncode, denied.stderr) == (1, 'Error from server (Forbidden): pods is forbidden: User '
                                                     '"bob" cannot list resource "pods" in API group "" in '
                                                     'the namespace "team-b"\n')
    assert kubectl("auth", "can-i", "list", "pods", "-n", "team-a", user="bob").stdout == "yes\n"
    no = kubectl("auth", "can-i", "delete", "pods", "-n", "team-a", user="bob", check=False)
    assert (no.returncode, no.stdout) == (1, "no\n")


def test_unknown_token_is_unauthorized(kubectl):
    result = kubectl("get", "pods", user="stranger", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("error: You must be logged in to the server (Unauthorized)")


def test_label_and_field_selectors(kubectl):
    by_label = kubectl("get", "pods", "-A", "-l", "app in (web,api),tier!=frontend", "-o", "name").stdout
    assert by_label == "pod/web-5d4f8c7b9-h7k2m\npod/web-5d4f8c7b9-q9w4z\npod/api-0\n"
    assert kubectl("get", "pods", "-A", "-l", "!pod-template-hash,app", "-o", "name").stdout == \
        "pod/hello\npod/api-0\n"
    by_field = kubectl("get", "pods", "-A", "--field-selector",
                       "metadata.namespace=team-a,metadata.name!=web-5d4f8c7b9-h7k2m", "-o", "name").stdout
    assert by_field == "pod/web-5d4f8c7b9-q9w4z\n"
    bad = kubectl("get", "pods", "--field-selector", "spec.color=red", check=False)
    assert bad.returncode == 1 and bad.stderr.endswith("field label not supported: spec.color\n")


def test_chunked_listing_matches_the_whole(kubectl):
    whole = kubectl("get", "pods", "-A", "-o", "name").stdout
    assert kubectl("get", "pods", "-A", "-o", "name", "--chunk-size=2").stdout == whole
    assert whole.count("\n") >= 5
