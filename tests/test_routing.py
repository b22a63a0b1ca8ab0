import pytest

from fastproxy.routing import (
    AUTH,
    CLUSTER,
    GRAFANA,
    HEALTH,
    MANAGEMENT,
    NOT_SERVED,
    OIDC,
    ROUTES,
    VIRTUAL_CLUSTER,
    Route,
    normalise_path,
    route,
)
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


@pytest.mark.parametrize("target,expected", [
    ("/kubernetes/management/apis/management.loft.sh/v1/users",
     Route(MANAGEMENT, path="/apis/management.loft.sh/v1/users")),
    ("/kubernetes/management", Route(MANAGEMENT)),
    ("/kubernetes/virtualcluster/c/ns/vc/api/v1/pods?watch=1",
     Route(VIRTUAL_CLUSTER, "c", "/api/v1/pods", "watch=1", "ns", "vc")),
    ("/auth/password/login", Route(AUTH, path="/password/login")),
    ("/oidc/token", Route(OIDC, path="/token")),
    ("/grafana/c/api/", Route(GRAFANA, "c", "/api/")),
    ("/kubernetes/cluster/prod", Route(CLUSTER, "prod")),
])
def test_router_table_maps_each_prefix(target, expected):
    assert route(target) == expected


@pytest.mark.parametrize("target,words", [
    ("/kubernetes/virtualcluster/c/ns", "names no virtualcluster"),
    ("/kubernetes/virtualcluster/c/Ns/vc/api", "name 'Ns' is not valid"),
    ("/kubernetes/cluster", "names no cluster"),
    ("/grafana", "names no grafana"),
    ("/healthz/more", "not served"),
])
def test_prefixes_without_their_names_are_404(target, words):
    with pytest.raises(StatusError) as err:
        route(target)
    assert err.value.code == 404 and words in err.value.message


def test_every_kind_but_health_says_why_it_is_not_served():
    assert set(NOT_SERVED) == {prefix.kind for prefix in ROUTES} - {HEALTH}


def test_health_routes():
    assert route("/healthz").kind == HEALTH
    assert route("/readyz?verbose").kind == HEALTH


def test_fast_path_returns_clean_paths_unchanged():
    path = "/kubernetes/cluster/c/api/v1/pods"
    assert normalise_path(path) is path
