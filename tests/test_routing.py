import pytest

from fastproxy.routing import CLUSTER, HEALTH, normalise_path, route
from fastproxy.status import StatusError


def test_cluster_route_keeps_rest_and_query():
    r = route("/kubernetes/cluster/prod-1/api/v1/namespaces/a/pods?labelSelector=app%3Dx&watch=1")
    assert (r.kind, r.cluster, r.path, r.query) == (CLUSTER, "prod-1", "/api/v1/namespaces/a/pods", "labelSelector=app%3Dx&watch=1")


@pytest.mark.parametrize("target,path", [
    ("/kubernetes/cluster/c", "/"),
    ("/kubernetes/cluster/c/", "/"),
    ("/kubernetes/cluster/c/api/", "/api/"),
    ("/kubernetes/cluster/c//api//v1", "/api/v1"),
    ("//kubernetes///cluster/c/api", "/api"),
    ("/kubernetes/cluster/c/./api/./v1/.", "/api/v1"),
    ("/kubernetes/cluster/c/%2e/api/%2E/v1", "/api/v1"),
    ("/kubernetes/./cluster/c/api", "/api"),
    ("/kubernetes/cluster/c/api/v1/namespaces/a.b/pods", "/api/v1/namespaces/a.b/pods"),
    ("/kubernetes/cluster/c/api/v1/namespaces/x/configmaps/...", "/api/v1/namespaces/x/configmaps/..."),
])
def test_normalised_paths(target, path):
    r = route(target)
    assert (r.kind, r.cluster, r.path) == (CLUSTER, "c", path)


@pytest.mark.parametrize("target", [
    "/kubernetes/cluster/a/../b/api",
    "/kubernetes/cluster/a/%2e%2e/b/api",
    "/kubernetes/cluster/a/.%2E/b/api",
    "/kubernetes/cluster/a/%2E./b/api",
    "/kubernetes/cluster/a/api/v1/..",
    "/kubernetes/cluster/a%2f..%2fb/api",
    "/kubernetes/cluster/a/api%2Fv1",
    "/kubernetes/cluster/a/api\\v1",
    "/kubernetes/cluster/a/api%5cv1",
    "/kubernetes/cluster/a/api%00",
    "/kubernetes/../kubernetes/cluster/b/api",
    "kubernetes/cluster/a/api",
    "http://evil/kubernetes/cluster/a/api",
    "/kubernetes/cluster/a/api#frag",
])
def test_hostile_paths_are_refused(target):
    with pytest.raises(StatusError) as err:
        route(target)
    assert err.value.code == 400


@pytest.mark.parametrize("target", [
    "/kubernetes/%63luster/a/api",          # an escaped prefix is not the prefix
    "/kubernetes/cluster/A/api",             # not a valid cluster name
    "/kubernetes/cluster/%61/api",
    "/kubernetes/cluster/",
    "/kubernetes/cluster",
    "/kubernetes",
    "/api/v1/pods",
    "/",
])
def test_unknown_routes_are_404(target):
    with pytest.raises(StatusError) as err:
        route(target)
    assert err.value.code == 404


@pytest.mark.parametrize("target,words", [
    ("/kubernetes/management/apis/management.loft.sh/v1/users", "management API"),
    ("/kubernetes/virtualcluster/c/ns/vc/api/v1/pods", "virtual clusters"),
    ("/auth/password/login", "/auth/"),
    ("/oidc/token", "/oidc/"),
    ("/grafana/c/api", "/grafana/"),
])
def test_later_prefixes_answer_404_naming_them(target, words):
    with pytest.raises(StatusError) as err:
        route(target)
    assert err.value.code == 404 and words in err.value.message


def test_health_routes():
    assert route("/healthz").kind == HEALTH
    assert route("/readyz?verbose").kind == HEALTH


def test_fast_path_returns_clean_paths_unchanged():
    path = "/kubernetes/cluster/c/api/v1/pods"
    assert normalise_path(path) is path
