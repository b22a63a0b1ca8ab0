"""Watches of different identities sharing one upstream stream, where a cluster allows it: the
real gateway process and the simulated cluster, whose RBAC answers the gateway's
SubjectAccessReviews. Streams are counted at the cluster, events at each client."""
from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devcluster.auth import GATEWAY_USER
from devcluster.process import start_devcluster
from fastproxy.demo import CLUSTER, VIEWER_RULES, prepare
from tests.e2e.test_kubectl_through_gateway import free_port
from tests.e2e.test_shared_watches import Watch, cluster_api, refused_watch, settle, upstream_watches
from tests.helpers import start_gateway

pytestmark = pytest.mark.e2e
OWN = "demo-own"  # the same cluster again, without sharing across identities
NAMESPACE = "team-a"  # where the viewer key may watch configmaps
RULES = [
    *VIEWER_RULES,
    # The shared stream runs as the gateway: it must be able to watch what it shares.
    {"users": [GATEWAY_USER], "verbs": ["list", "watch"], "resources": ["configmaps"], "apiGroups": [""]},
    # May watch but not list: its first events would be list data, so it must not join.
    {"groups": ["demo:watch-only"], "verbs": ["watch"], "resources": ["configmaps"], "apiGroups": [""]},
]
KEYS = {"outsider": [], "watch-only": ["demo:watch-only"]}  # access keys beside the demo's admin and viewer


def watch_path(cluster: str = CLUSTER) -> str:
    return f"/kubernetes/cluster/{cluster}/api/v1/namespaces/{NAMESPACE}/configmaps?watch=1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("shared-across")
    cluster = start_devcluster(state / "cluster", rules=RULES, verbose=True)
    gateway = None
    try:
        listen = f"127.0.0.1:{free_port()}"
        config = prepare(state, cluster.url, cluster.ca_file, cluster.gateway_token_file, listen)
        text = config.read_text().replace(f'name = "{CLUSTER}"\n', f'name = "{CLUSTER}"\nshare_watches_across_identities = true\n', 1)
        text += (f'\n[[clusters]]\nname = "{OWN}"\nserver = "{cluster.url}"\nca_file = "{cluster.ca_file}"\n'
                 f'token_file = "{cluster.gateway_token_file}"\n')
        for name, groups in KEYS.items():
            (state / f"{name}.key").write_text(f"fpk-{name}-key\n")
            text += (f'\n[[access_keys]]\nname = "{name}"\nkey_file = "{name}.key"\nuser = "{name}"\n'
                     f"groups = {groups!r}\n").replace("'", '"')
        gateway = start_gateway(text, state)
        yield state, None, cluster, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.stop()


def create_configmap(cluster, name: str) -> None:
    cluster_api(cluster, "POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps",
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})


def delete_configmap(cluster, name: str) -> None:
    """Cleanup: a test that failed before creating it leaves none to delete."""
    try:
        cluster_api(cluster, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/configmaps/{name}")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise


def reviewed(cluster, user: str) -> list[tuple[str, str, str]]:
    """(verb, resource, namespace) of each SubjectAccessReview the cluster answered about `user`."""
    return [(spec["resourceAttributes"]["verb"], spec["resourceAttributes"]["resource"],
             spec["resourceAttributes"].get("namespace", ""))
            for spec in cluster_api(cluster, "GET", "/devcluster/subjectaccessreviews") if spec.get("user") == user]


def joiner_reviews(stack) -> dict[str, float]:
    """fastproxy_shared_watch_reviews_total by outcome, scraped from the gateway with the admin key."""
    state, _, _, gateway = stack
    request = urllib.request.Request(f"https://localhost:{gateway.port}/metrics", headers={
        "Authorization": f"Bearer {(state / 'admin.key').read_text().strip()}"})
    context = ssl.create_default_context(cafile=str(state / "gateway-tls" / "ca.crt"))
    with urllib.request.urlopen(request, context=context, timeout=10) as answer:
        text = answer.read().decode()
    return {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "fastproxy_shared_watch_reviews" for sample in family.samples}


def forbidden(user: str, verb: str) -> str:
    return (f'configmaps is forbidden: User "{user}" cannot {verb} resource "configmaps" in API group "" '
            f'in the namespace "{NAMESPACE}"')


def test_identities_the_cluster_allows_share_one_stream_and_others_get_403_and_no_event(stack):
    _, _, cluster, _ = stack
    before, counted = upstream_watches(cluster), joiner_reviews(stack)
    admin = Watch(stack, path=watch_path(), key="admin")
    viewer = None
    try:
        assert sorted(admin.named() for _ in range(2)) == [("ADDED", "app-config"), ("ADDED", "feature-flags")]
        viewer = Watch(stack, path=watch_path(), key="viewer")
        assert sorted(viewer.named() for _ in range(2)) == [("ADDED", "app-config"), ("ADDED", "feature-flags")]
        # Each joiner was admitted on the cluster's word: watch, and list (the ADDED burst is list data).
        assert sorted(reviewed(cluster, "viewer")) == [("list", "configmaps", NAMESPACE),
                                                      ("watch", "configmaps", NAMESPACE)]
        assert sorted(reviewed(cluster, "admin")) == [("list", "configmaps", NAMESPACE),
                                                     ("watch", "configmaps", NAMESPACE)]

        for key, user, verb, headers in (("outsider", "outsider", "watch", ""),
                                         ("watch-only", "watch-only", "list", ""),
                                         # kubectl --as: the identity asked for is the one reviewed
                                         ("admin", "outsider", "watch", "Impersonate-User: outsider\r\n")):
            head, status = refused_watch(stack, path=watch_path(), key=key, headers=headers)
            assert head.startswith(b"HTTP/1.1 403"), head
            assert status["message"] == forbidden(user, verb) and status["reason"] == "Forbidden"
            assert status["details"] == {"kind": "configmaps"}

        # Counted by outcome: the two joiners let in, the three refused; no review went unanswered.
        now = joiner_reviews(stack)
        assert {outcome: now[outcome] - counted[outcome] for outcome in now} == {
            "allowed": 2, "refused": 3, "failed": 0}

        create_configmap(cluster, "across-1")
        assert admin.named() == ("ADDED", "across-1")
        assert viewer.named() == ("ADDED", "across-1")
    finally:
        admin.close()
        if viewer is not None:
            viewer.close()
        delete_configmap(cluster, "across-1")
    # Two clients on one stream; the refused ones never reached the cluster as watches.
    assert settle(lambda: upstream_watches(cluster), before + 1) == before + 1


def test_a_review_answer_is_reused_by_the_next_joiners(stack):
    _, _, cluster, _ = stack
    before, asked = upstream_watches(cluster), len(reviewed(cluster, "viewer"))
    watches = []
    try:
        for _ in range(3):
            watches.append(Watch(stack, path=watch_path(), key="viewer"))
            assert watches[-1].named()[0] == "ADDED"
    finally:
        for watch in watches:
            watch.close()
    # The first may have asked (an earlier test's answer may still be fresh); the others did not.
    assert len(reviewed(cluster, "viewer")) - asked in (0, 2)
    assert settle(lambda: upstream_watches(cluster), before + 1) == before + 1


def test_without_the_option_identities_keep_streams_of_their_own(stack):
    _, _, cluster, _ = stack
    before = upstream_watches(cluster)
    watches = []
    try:
        for key in ("admin", "viewer"):
            watches.append(Watch(stack, path=watch_path(OWN), key=key))
            assert sorted(watches[-1].named() for _ in range(2)) == [("ADDED", "app-config"),
                                                                    ("ADDED", "feature-flags")]
        create_configmap(cluster, "own-1")
        for watch in watches:
            assert watch.named() == ("ADDED", "own-1")
        # A second watch of the same identity still shares that identity's stream.
        watches.append(Watch(stack, path=watch_path(OWN), key="viewer"))
        assert watches[-1].named()[0] == "ADDED"
    finally:
        for watch in watches:
            watch.close()
        delete_configmap(cluster, "own-1")
    assert settle(lambda: upstream_watches(cluster), before + 2) == before + 2
