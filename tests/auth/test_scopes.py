"""AccessKeyScope: strict parsing, and for each field a request it allows and its neighbour it refuses."""
from __future__ import annotations

import pytest

from fastproxy.auth.requestinfo import request_info
from fastproxy.auth.scopes import (
    AccessKeyScope,
    GroupResources,
    ScopeCluster,
    ScopeError,
    ScopeRule,
    check_scope,
    load_scope,
    parse_scope,
    reaches_virtual_cluster,
)

MGMT = "/apis/management.loft.sh/v1"


def check(scope, method, path, target="Cluster", cluster="prod", query="", **where):
    compiled = None if scope is None else load_scope(scope)
    return check_scope(compiled, request_info(method, path, query), target, cluster, **where)


def allowed(*args, **kwargs):
    return check(*args, **kwargs) is None


# ---- parsing ----

FULL_SCOPE = {
    "roles": [{"role": "loft-cli", "projects": ["a"], "virtualClusters": ["v"]}],
    "projects": [{"project": "a"}],
    "spaces": [{"project": "a", "space": "s"}],
    "virtualClusters": [{"project": "a", "virtualCluster": "*"}],
    "clusters": [{"cluster": "prod"}],
    "rules": [
        {"verbs": ["get"], "resources": [{"group": "apps", "resources": ["deployments"], "resourceNames": ["d"]}],
         "namespaces": ["dev", ""], "requestTargets": ["Cluster"], "cluster": "prod",
         "virtualClusters": [{"name": "v", "namespace": "ns"}]},
        {"nonResourceURLs": ["/metrics", "/healthz*"]},
    ],
    "allowLoftCli": True,
}


def test_parse_reads_every_field_and_round_trips():
    scope = parse_scope(FULL_SCOPE)
    assert scope.roles[0].virtual_clusters == ("v",)
    assert scope.virtual_clusters[0].virtual_cluster == "*"
    assert scope.rules[0].resources[0] == GroupResources("apps", ("deployments",), ("d",))
    assert scope.rules[1].non_resource_urls == ("/metrics", "/healthz*")
    assert scope.allow_loft_cli is True
    assert scope.to_dict() == FULL_SCOPE


def test_parse_accepts_json_text_and_nulls():
    assert parse_scope(b'{"clusters": [{"cluster": "prod"}], "rules": null}') == AccessKeyScope(
        clusters=(ScopeCluster("prod"),))
    assert parse_scope('{"rules": [{"verbs": null}]}') == AccessKeyScope(rules=(ScopeRule(),))


@pytest.mark.parametrize("data, message", [
    ('{"clusterz": []}', "scope: unknown key 'clusterz'"),
    ({"rules": [{"verb": ["get"]}]}, "scope: unknown key 'rules[0].verb'"),
    ({"rules": [{}, {"resources": [{"resource": ["pods"]}]}]}, "scope: unknown key 'rules[1].resources[0].resource'"),
    ({"clusters": {"cluster": "a"}}, "scope: clusters: expected a list"),
    ({"clusters": ["a"]}, "scope: clusters[0]: expected an object"),
    ({"rules": [{"verbs": "get"}]}, "scope: rules[0].verbs: expected a list"),
    ({"rules": [{"verbs": ["get", 1]}]}, "scope: rules[0].verbs[1]: expected a string"),
    ({"rules": [{"cluster": 5}]}, "scope: rules[0].cluster: expected a string"),
    ({"allowLoftCli": "yes"}, "scope: allowLoftCli: expected a boolean"),
    ({"roles": [{"role": "admin"}]},
     "scope: roles[0].role: unknown role 'admin' (known: agent, loft-cli, loftCLI, network-peer, runner, vcluster)"),
    ({"clusters": [{}]}, "scope: clusters[0].cluster: must not be empty"),
    ({"spaces": [{"project": "a"}]}, "scope: spaces[0].space: must not be empty"),
    ({"spaces": [{"project": "*", "space": "s"}]}, "scope: spaces[0].project: '*' is not allowed here"),
    ({"virtualClusters": [{"project": "*", "virtualCluster": "v"}]},
     "scope: virtualClusters[0].project: '*' is not allowed here"),
    ({"rules": [{"resources": [{"resources": ["pods"]}], "nonResourceURLs": ["/x"]}]},
     "scope: rules[0]: resources and nonResourceURLs cannot both be set"),
    ({"rules": [{"nonResourceURLs": ["/a*b"]}]},
     "scope: rules[0].nonResourceURLs[0]: '/a*b' must start with '/' and may only end with '*'"),
    ({"rules": [{"nonResourceURLs": ["metrics"]}]},
     "scope: rules[0].nonResourceURLs[0]: 'metrics' must start with '/' and may only end with '*'"),
    ({"rules": [{"resources": [{"resourceNames": ["x"]}]}]},
     "scope: rules[0].resources[0].resourceNames requires resources"),
    ({"rules": [{"resources": [{"resources": ["pods/x/y"]}]}]},
     "scope: rules[0].resources[0].resources[0]: 'pods/x/y' is not RESOURCE, RESOURCE/SUBRESOURCE or a '*' form"),
    ({"rules": [{"resources": [{"resources": ["*/*"]}]}]},
     "scope: rules[0].resources[0].resources[0]: '*/*' is not RESOURCE, RESOURCE/SUBRESOURCE or a '*' form"),
    ({"rules": [{"resources": [{"resources": ["pods*"]}]}]},
     "scope: rules[0].resources[0].resources[0]: 'pods*' is not RESOURCE, RESOURCE/SUBRESOURCE or a '*' form"),
    ({"rules": [{"requestTargets": ["Clusters"]}]},
     "scope: rules[0].requestTargets[0]: unknown request target 'Clusters'"),
    ("[]", "scope: expected an object"),
    ("{", "scope: not valid JSON: unexpected end of data: line 1 column 2 (char 1)"),
])
def test_parse_refuses_bad_input_naming_the_key(data, message):
    with pytest.raises(ScopeError) as raised:
        parse_scope(data)
    assert str(raised.value) == message


# ---- whole-scope behaviour ----

def test_no_scope_allows_everything():
    assert allowed(None, "DELETE", "/api/v1/namespaces/kube-system/secrets", target="Management", cluster="")


def test_an_empty_scope_allows_nothing():
    assert check({}, "GET", "/api/v1/pods") == "access key scope does not allow list pods on cluster 'prod'"


def test_unknown_target_is_refused():
    assert check({"clusters": [{"cluster": "*"}]}, "GET", "/version", target="Grafana") == \
        "unknown request target 'Grafana'"


# ---- clusters ----

def test_clusters_allow_the_named_cluster_only():
    scope = {"clusters": [{"cluster": "prod"}]}
    assert allowed(scope, "DELETE", "/api/v1/namespaces/x/pods/p", cluster="prod")
    assert check(scope, "GET", "/api/v1/pods", cluster="dev") == \
        "access key scope does not allow list pods on cluster 'dev'"
    assert allowed(scope, "GET", "/api/v1/pods", target="VirtualCluster", cluster="prod",
                   virtual_cluster="v", vcluster_namespace="ns")
    assert check(scope, "GET", f"{MGMT}/clusters/prod", target="Management", cluster="") == \
        "access key scope does not allow get clusters.management.loft.sh 'prod' on the management API"


def test_cluster_wildcard_allows_any_cluster_but_not_management():
    scope = {"clusters": [{"cluster": "*"}]}
    assert allowed(scope, "GET", "/api/v1/pods", cluster="anything")
    assert not allowed(scope, "GET", f"{MGMT}/projects", target="Management", cluster="")


# ---- projects, spaces, virtual clusters ----

def test_projects_allow_their_spaces_virtual_clusters_and_namespace():
    scope = {"projects": [{"project": "a"}]}
    assert allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="a", space="s")
    assert check(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="b", space="s") == \
        "access key scope does not allow list pods on space 's' of project 'b'"
    assert allowed(scope, "GET", "/api/v1/pods", target="ProjectVirtualCluster", project="a", virtual_cluster="v")
    assert not allowed(scope, "GET", "/api/v1/pods", target="ProjectVirtualCluster", project="b",
                       virtual_cluster="v")
    assert allowed(scope, "GET", f"{MGMT}/projects/a/clusters", target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/projects/b", target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/projects", target="Management", cluster="")
    assert allowed(scope, "DELETE", f"{MGMT}/namespaces/loft-p-a/virtualclusterinstances/v",
                   target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-b/virtualclusterinstances",
                       target="Management", cluster="")
    assert not allowed(scope, "GET", "/api/v1/pods", cluster="prod")


def test_project_wildcard():
    scope = {"projects": [{"project": "*"}]}
    assert allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="any", space="s")
    assert allowed(scope, "GET", f"{MGMT}/projects", target="Management", cluster="")
    assert allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-any/spaceinstances", target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/namespaces/default/spaceinstances", target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/users", target="Management", cluster="")


def test_project_namespace_prefix_is_configurable():
    compiled = load_scope({"projects": [{"project": "a"}]}, project_namespace_prefix="p-")
    assert check_scope(compiled, request_info("GET", f"{MGMT}/namespaces/p-a/spaceinstances", ""), "Management") is None
    assert check_scope(compiled, request_info("GET", f"{MGMT}/namespaces/loft-p-a/spaceinstances", ""),
                       "Management") is not None


def test_spaces_allow_the_named_space_only():
    scope = {"spaces": [{"project": "a", "space": "s"}]}
    assert allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="a", space="s")
    assert not allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="a", space="t")
    assert not allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="b", space="s")
    assert not allowed(scope, "GET", "/api/v1/pods", target="ProjectVirtualCluster", project="a", virtual_cluster="s")
    assert allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-a/spaceinstances/s", target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-a/spaceinstances/t", target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-a/spaceinstances", target="Management", cluster="")


def test_space_wildcard_covers_one_project():
    scope = {"spaces": [{"project": "a", "space": "*"}]}
    assert allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="a", space="t")
    assert allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-a/spaceinstances", target="Management", cluster="")
    assert not allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="b", space="t")


def test_virtual_clusters_allow_the_named_virtual_cluster_only():
    scope = {"virtualClusters": [{"project": "a", "virtualCluster": "v"}]}
    assert allowed(scope, "GET", "/api/v1/pods", target="ProjectVirtualCluster", project="a", virtual_cluster="v")
    assert check(scope, "GET", "/api/v1/pods", target="ProjectVirtualCluster", project="a", virtual_cluster="w") == \
        "access key scope does not allow list pods on virtual cluster 'w' of project 'a'"
    assert not allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="a", space="v")
    assert allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-a/virtualclusterinstances/v",
                   target="Management", cluster="")
    assert not allowed(scope, "GET", f"{MGMT}/namespaces/loft-p-a/virtualclusterinstances/w",
                       target="Management", cluster="")


# ---- the loft-cli role ----

@pytest.mark.parametrize("scope", [
    {"roles": [{"role": "loft-cli"}]}, {"roles": [{"role": "loftCLI"}]}, {"allowLoftCli": True}])
def test_loft_cli_role_allows_the_cli_reads(scope):
    def management(method, path, query=""):
        return check(scope, method, path, target="Management", cluster="", query=query)
    assert management("POST", f"{MGMT}/selves") is None
    assert management("POST", f"{MGMT}/selfsubjectaccessreviews") is None
    assert management("GET", f"{MGMT}/clusters") is None
    assert management("GET", f"{MGMT}/projects", "watch=1") is None
    assert management("GET", f"{MGMT}/projects/a/clusters") is None
    assert management("GET", f"{MGMT}/namespaces/loft-p-a/virtualclusterinstances") is None
    assert management("GET", "/version") is None
    assert management("GET", f"{MGMT}") is None
    assert management("DELETE", f"{MGMT}/projects/a") == \
        "access key scope does not allow delete projects.management.loft.sh 'a' on the management API"
    assert management("GET", f"{MGMT}/clusters/prod/accesskey") is not None
    assert management("GET", f"{MGMT}/users") is not None
    assert management("POST", f"{MGMT}/directclusterendpointtokens") is not None
    assert management("GET", "/metrics") == "access key scope does not allow get /metrics on the management API"
    assert management("POST", "/version") is not None
    assert not allowed(scope, "GET", "/api/v1/pods")


def test_loft_cli_role_narrowed_to_projects_and_virtual_clusters():
    scope = {"roles": [{"role": "loft-cli", "projects": ["a"], "virtualClusters": ["v"]}]}

    def management(method, path):
        return allowed(scope, method, path, target="Management", cluster="")
    assert management("GET", f"{MGMT}/namespaces/loft-p-a/virtualclusterinstances")
    assert management("GET", f"{MGMT}/namespaces/loft-p-a/virtualclusterinstances/v")
    assert not management("GET", f"{MGMT}/namespaces/loft-p-a/virtualclusterinstances/w")
    assert not management("GET", f"{MGMT}/namespaces/loft-p-b/virtualclusterinstances")
    assert not management("GET", f"{MGMT}/virtualclusterinstances")  # all namespaces would reach b
    assert management("GET", f"{MGMT}/projects/a")
    assert not management("GET", f"{MGMT}/projects/b")
    assert not management("GET", f"{MGMT}/projects")
    assert management("GET", f"{MGMT}/clusters")


@pytest.mark.parametrize("role", ["agent", "vcluster", "network-peer", "runner"])
def test_component_roles_grant_nothing_here(role):
    assert not allowed({"roles": [{"role": role}]}, "POST", f"{MGMT}/selves", target="Management", cluster="")
    assert not allowed({"roles": [{"role": role}]}, "GET", "/api/v1/pods")


# ---- rules, field by field ----

def rule(**fields):
    return {"rules": [fields]}


def test_rule_verbs():
    scope = rule(verbs=["get"])
    assert allowed(scope, "GET", "/api/v1/namespaces/x/pods/p")
    assert check(scope, "GET", "/api/v1/namespaces/x/pods") == \
        "access key scope does not allow list pods in namespace 'x' on cluster 'prod'"
    assert allowed(rule(verbs=["*"]), "DELETE", "/api/v1/namespaces/x/pods")
    assert allowed(rule(), "DELETE", "/api/v1/namespaces/x/pods")


@pytest.mark.parametrize("resources, path, expected", [
    (["pods"], "/api/v1/namespaces/x/pods/p", True),
    (["pods"], "/api/v1/namespaces/x/pods/p/log", False),
    (["pods/log"], "/api/v1/namespaces/x/pods/p/log", True),
    (["pods/log"], "/api/v1/namespaces/x/pods/p", False),
    (["pods/log"], "/api/v1/namespaces/x/pods/p/exec", False),
    (["*"], "/api/v1/namespaces/x/secrets/s", True),
    (["*"], "/api/v1/namespaces/x/pods/p/log", True),
    (["pods/*"], "/api/v1/namespaces/x/pods/p/log", True),
    (["pods/*"], "/api/v1/namespaces/x/pods/p/exec", True),
    (["pods/*"], "/api/v1/namespaces/x/pods/p", False),
    (["pods/*"], "/api/v1/namespaces/x/services/s/proxy", False),
    (["*/scale"], "/apis/apps/v1/namespaces/x/deployments/d/scale", True),
    (["*/scale"], "/apis/apps/v1/namespaces/x/replicasets/r/scale", True),
    (["*/scale"], "/apis/apps/v1/namespaces/x/deployments/d", False),
    (["*/scale"], "/apis/apps/v1/namespaces/x/deployments/d/status", False),
])
def test_rule_resource_syntax(resources, path, expected):
    group = "apps" if path.startswith("/apis/apps") else ""
    assert allowed(rule(verbs=["get"], resources=[{"group": group, "resources": resources}]), "GET", path) is expected


def test_rule_resource_groups():
    scope = rule(resources=[{"group": "apps", "resources": ["deployments"]}])
    assert allowed(scope, "GET", "/apis/apps/v1/namespaces/x/deployments/d")
    assert check(scope, "GET", "/apis/extensions/v1beta1/namespaces/x/deployments/d") == (
        "access key scope does not allow get deployments.extensions 'd' in namespace 'x' on cluster 'prod'")
    assert not allowed(scope, "GET", "/api/v1/namespaces/x/pods/p")
    every_apps = rule(resources=[{"group": "apps"}])  # no resources: all of the group
    assert allowed(every_apps, "GET", "/apis/apps/v1/namespaces/x/statefulsets/s/scale")
    assert not allowed(every_apps, "GET", "/apis/batch/v1/namespaces/x/jobs/j")
    assert allowed(rule(resources=[{"group": "*", "resources": ["jobs"]}]), "GET", "/apis/batch/v1/namespaces/x/jobs/j")


def test_rule_resource_names():
    scope = rule(resources=[{"resources": ["pods"], "resourceNames": ["a"]}])
    assert allowed(scope, "GET", "/api/v1/namespaces/x/pods/a")
    assert not allowed(scope, "GET", "/api/v1/namespaces/x/pods/b")
    assert not allowed(scope, "GET", "/api/v1/namespaces/x/pods")
    assert allowed(scope, "GET", "/api/v1/namespaces/x/pods", query="fieldSelector=metadata.name%3Da")


def test_rule_namespaces():
    scope = rule(namespaces=["dev"])
    assert allowed(scope, "GET", "/api/v1/namespaces/dev/pods")
    assert not allowed(scope, "GET", "/api/v1/namespaces/prod/pods")
    assert not allowed(scope, "GET", "/api/v1/pods")
    assert not allowed(scope, "GET", "/api/v1/nodes/n")
    cluster_scoped = rule(namespaces=[""])
    assert allowed(cluster_scoped, "GET", "/api/v1/nodes/n")
    assert not allowed(cluster_scoped, "GET", "/api/v1/namespaces/dev/pods")


def test_rule_non_resource_urls():
    scope = rule(nonResourceURLs=["/metrics", "/healthz*"])
    assert allowed(scope, "GET", "/metrics")
    assert check(scope, "GET", "/metricsx") == "access key scope does not allow get /metricsx on cluster 'prod'"
    assert allowed(scope, "GET", "/healthz/etcd")
    assert allowed(scope, "GET", "/healthz")
    assert not allowed(scope, "GET", "/livez")
    assert not allowed(scope, "GET", "/api/v1/pods")
    assert not allowed(rule(resources=[{"resources": ["pods"]}]), "GET", "/metrics")
    assert allowed(rule(verbs=["get"]), "GET", "/metrics")  # neither resources nor URLs: both
    assert not allowed(rule(verbs=["get"]), "POST", "/metrics")


def test_rule_request_targets():
    scope = rule(requestTargets=["Cluster"])
    assert allowed(scope, "GET", "/api/v1/pods")
    assert check(scope, "GET", f"{MGMT}/users", target="Management", cluster="") == \
        "access key scope does not allow list users.management.loft.sh on the management API"
    assert not allowed(scope, "GET", "/api/v1/pods", target="ProjectSpace", project="a", space="s")


def test_rule_cluster():
    scope = rule(cluster="prod")
    assert allowed(scope, "GET", "/api/v1/pods", cluster="prod")
    assert not allowed(scope, "GET", "/api/v1/pods", cluster="dev")
    assert not allowed(scope, "GET", f"{MGMT}/users", target="Management", cluster="")


def test_rule_virtual_clusters():
    scope = rule(virtualClusters=[{"name": "v", "namespace": "ns"}])
    assert allowed(scope, "GET", "/api/v1/pods", target="VirtualCluster", virtual_cluster="v", vcluster_namespace="ns")
    assert check(scope, "GET", "/api/v1/pods", target="VirtualCluster", virtual_cluster="w",
                 vcluster_namespace="ns") == "access key scope does not allow list pods on virtual cluster ns/w on cluster 'prod'"
    assert not allowed(scope, "GET", "/api/v1/pods", target="VirtualCluster", virtual_cluster="v",
                       vcluster_namespace="other")
    assert allowed(scope, "GET", "/api/v1/pods", target="Cluster")  # only virtual cluster requests are narrowed
    any_name = rule(virtualClusters=[{"namespace": "ns"}])
    assert allowed(any_name, "GET", "/api/v1/pods", target="VirtualCluster", virtual_cluster="w",
                   vcluster_namespace="ns")


def test_what_reaches_a_virtual_cluster():
    """Whether kubectl may discover a virtual cluster: anything the scope allows there."""
    def reaches(scope, cluster="prod", name="v", namespace="ns"):
        return reaches_virtual_cluster(load_scope(scope), cluster, name, namespace)
    assert reaches({"clusters": [{"cluster": "prod"}]}) and not reaches({"clusters": [{"cluster": "dev"}]})
    assert reaches({"clusters": [{"cluster": "*"}]}, cluster="any")
    named = {"rules": [{"requestTargets": ["VirtualCluster"], "virtualClusters": [{"name": "v", "namespace": "ns"}]}]}
    assert reaches(named) and not reaches(named, name="w") and not reaches(named, namespace="other")
    assert reaches({"rules": [{"requestTargets": ["VirtualCluster"], "cluster": "prod"}]})
    assert not reaches({"rules": [{"requestTargets": ["VirtualCluster"], "cluster": "dev"}]})
    assert not reaches({"rules": [{"requestTargets": ["Cluster"]}]})  # a cluster rule is not a virtual cluster's


@pytest.mark.parametrize("verbs", [["create"], ["get"]])
@pytest.mark.parametrize("subresource", ["exec", "attach", "portforward"])
def test_connect_subresources_match_both_get_and_create(verbs, subresource):
    scope = rule(verbs=verbs, resources=[{"resources": [f"pods/{subresource}"]}])
    path = f"/api/v1/namespaces/x/pods/p/{subresource}"
    assert allowed(scope, "GET", path)    # WebSocket
    assert allowed(scope, "POST", path)   # SPDY
    assert not allowed(scope, "DELETE", path)


def test_get_create_equivalence_is_only_for_connect_subresources():
    scope = rule(verbs=["create"], resources=[{"resources": ["pods/log", "pods/exec"]}])
    assert not allowed(scope, "GET", "/api/v1/namespaces/x/pods/p/log")
    assert not allowed(rule(verbs=["list"], resources=[{"resources": ["pods/exec"]}]),
                       "GET", "/api/v1/namespaces/x/pods/p/exec")


def test_parts_of_a_scope_add_up():
    scope = {"clusters": [{"cluster": "dev"}],
             "rules": [{"verbs": ["get", "list"], "resources": [{"resources": ["pods"]}], "cluster": "prod"}]}
    assert allowed(scope, "DELETE", "/api/v1/namespaces/x/secrets/s", cluster="dev")
    assert allowed(scope, "GET", "/api/v1/namespaces/x/pods", cluster="prod")
    assert not allowed(scope, "DELETE", "/api/v1/namespaces/x/pods/p", cluster="prod")
