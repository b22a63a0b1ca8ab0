"""The audit policy (audit.k8s.io/v1 Policy): loading, first-match semantics of every selector, the
refusals and their messages, and the [audit] configuration table."""
from __future__ import annotations

import json
import math

import pytest

from fastproxy.auth.requestinfo import RequestInfo, request_info
from fastproxy.config import ConfigError
from fastproxy.observe.audit import (
    DEFAULT_POLICY,
    METADATA,
    NONE,
    REQUEST,
    REQUEST_RESPONSE,
    AuditConfig,
    PolicyError,
    load_policy,
    parse_audit_config,
    parse_policy,
)

POD_GET = request_info("GET", "/api/v1/namespaces/dev/pods/web", "")
POD_LOG = request_info("GET", "/api/v1/namespaces/dev/pods/web/log", "follow=true")
POD_LIST = request_info("GET", "/api/v1/namespaces/dev/pods", "")
SECRET_GET = request_info("GET", "/api/v1/namespaces/dev/secrets/db", "")
NODE_GET = request_info("GET", "/api/v1/nodes/n1", "")
DEPLOY_SCALE = request_info("PUT", "/apis/apps/v1/namespaces/dev/deployments/api/scale", "")
HEALTHZ = request_info("GET", "/healthz/etcd", "")
VERSION = request_info("GET", "/version", "")


def policy(*rules, **top):
    return parse_policy({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": list(rules), **top})


def level(p, info, user="alice", groups=("dev",), target="Cluster", cluster="prod"):
    rule = p.rule_for(user, tuple(groups), info, target, cluster)
    return None if rule is None else rule.level


# --- first match -------------------------------------------------------------------------------

def test_the_first_matching_rule_wins_and_no_match_is_not_logged():
    p = policy({"level": "None", "users": ["bob"]},
               {"level": "RequestResponse", "resources": [{"group": "", "resources": ["secrets"]}]},
               {"level": "Request", "verbs": ["get"]},
               {"level": "Metadata", "verbs": ["get", "list"]})
    assert level(p, SECRET_GET, user="bob") == NONE           # rule 0, before the secrets rule
    assert level(p, SECRET_GET) == REQUEST_RESPONSE            # rule 1 before the get rule
    assert level(p, POD_GET) == REQUEST                        # rule 2 before the get/list rule
    assert level(p, POD_LIST) == METADATA                      # rule 3
    assert level(p, request_info("DELETE", "/api/v1/namespaces/dev/pods/web", "")) is None  # nothing matches


def test_the_default_policy_logs_everything_at_metadata():
    for info in (POD_GET, HEALTHZ, SECRET_GET):
        assert level(DEFAULT_POLICY, info, user=None, groups=()) == METADATA


def test_users_and_user_groups():
    p = policy({"level": "Request", "users": ["alice", "carol"]}, {"level": "Metadata", "userGroups": ["ops", "qa"]})
    assert level(p, POD_GET, user="carol", groups=()) == REQUEST
    assert level(p, POD_GET, user="dave", groups=("dev", "qa")) == METADATA   # any one group is enough
    assert level(p, POD_GET, user="dave", groups=("dev",)) is None
    assert level(p, POD_GET, user=None, groups=()) is None                     # unauthenticated: no user, no group


def test_verbs_compare_the_request_info_verb():
    p = policy({"level": "Metadata", "verbs": ["watch", "deletecollection"]})
    assert level(p, request_info("GET", "/api/v1/pods", "watch=true")) == METADATA
    assert level(p, request_info("DELETE", "/api/v1/namespaces/dev/pods", "")) == METADATA
    assert level(p, POD_LIST) is None


def test_resources_groups_subresources_and_wildcards():
    def rule(*resources, group=""):
        return policy({"level": "Metadata", "resources": [{"group": group, "resources": list(resources)}]})
    assert level(rule("pods"), POD_GET) == METADATA
    assert level(rule("pods"), POD_LOG) is None               # a subresource is not its resource
    assert level(rule("pods/log"), POD_LOG) == METADATA
    assert level(rule("pods/log"), POD_GET) is None
    # "pods/*" is pods and every subresource of it, as the API server's checker has it.
    assert level(rule("pods/*"), POD_LOG) == METADATA and level(rule("pods/*"), POD_GET) == METADATA
    assert level(rule("pods/*"), SECRET_GET) is None
    assert level(rule("*/log"), POD_LOG) == METADATA and level(rule("*/log"), POD_GET) is None
    assert level(rule("*"), POD_LOG) == METADATA and level(rule("*"), NODE_GET) == METADATA
    assert level(rule("deployments/scale", group="apps"), DEPLOY_SCALE) == METADATA
    assert level(rule("deployments/scale"), DEPLOY_SCALE) is None  # the core group is not apps
    assert level(rule("*"), HEALTHZ) is None                  # resources never match a non-resource URL
    group_only = policy({"level": "Metadata", "resources": [{"group": "apps"}]})
    assert level(group_only, DEPLOY_SCALE) == METADATA and level(group_only, POD_GET) is None


def test_resource_names():
    p = policy({"level": "Metadata", "resources": [{"resources": ["secrets", "configmaps"], "resourceNames": ["db"]}]})
    assert level(p, SECRET_GET) == METADATA
    assert level(p, request_info("GET", "/api/v1/namespaces/dev/secrets/other", "")) is None
    assert level(p, request_info("GET", "/api/v1/namespaces/dev/secrets", "")) is None  # a list has no name


def test_namespaces_with_the_empty_string_for_cluster_scoped():
    p = policy({"level": "Metadata", "namespaces": ["kube-system", ""]})
    assert level(p, NODE_GET) == METADATA
    assert level(p, request_info("GET", "/api/v1/namespaces/kube-system/pods", "")) == METADATA
    assert level(p, POD_GET) is None
    assert level(p, VERSION) is None                          # namespaces select resource requests only


def test_non_resource_urls_exact_and_trailing_star():
    p = policy({"level": "Metadata", "nonResourceURLs": ["/version", "/healthz*"]})
    assert level(p, VERSION) == METADATA and level(p, HEALTHZ) == METADATA
    assert level(p, request_info("GET", "/healthz", "")) == METADATA
    assert level(p, request_info("GET", "/versions", "")) is None
    assert level(p, POD_GET) is None                          # a resource request is no non-resource URL
    assert level(policy({"level": "Request", "nonResourceURLs": ["*"]}), request_info("GET", "/metrics", "")) == REQUEST


def test_request_targets_and_clusters():
    p = policy({"level": "Request", "requestTargets": ["Management"]},
               {"level": "Metadata", "clusters": ["prod"]},
               {"level": "RequestResponse", "clusters": ["*"]})
    assert level(p, POD_GET, target="Management", cluster="") == REQUEST
    assert level(p, POD_GET, target="Cluster", cluster="prod") == METADATA
    assert level(p, POD_GET, target="Cluster", cluster="staging") == REQUEST_RESPONSE
    assert level(p, HEALTHZ, target=None, cluster="") is None  # no request target, no cluster


def test_omit_stages_are_the_union_of_the_policy_and_the_rule():
    p = policy({"level": "Metadata", "omitStages": ["ResponseStarted"]}, omitStages=["RequestReceived"])
    assert p.rules[0].omit_stages == {"RequestReceived", "ResponseStarted"}
    assert p.omit_stages == {"RequestReceived"}


def test_omit_managed_fields_rule_overrides_policy():
    p = policy({"level": "Request", "omitManagedFields": False}, {"level": "Request"}, omitManagedFields=True)
    assert [r.omit_managed_fields for r in p.rules] == [False, True]


def test_empty_selector_lists_match_everything_as_in_the_api_server():
    p = policy({"level": "Metadata", "users": [], "verbs": [], "resources": [], "namespaces": []})
    assert level(p, HEALTHZ) == METADATA and level(p, POD_GET) == METADATA


# --- files ---------------------------------------------------------------------------------------

def test_a_yaml_file_and_a_json_file(tmp_path):
    yaml_file = tmp_path / "policy.yaml"
    yaml_file.write_text("""\
apiVersion: audit.k8s.io/v1
kind: Policy
metadata:
  name: gateway
omitStages: [RequestReceived]
rules:
  - level: None
    nonResourceURLs: ["/healthz*"]
  - level: RequestResponse
    resources:
      - group: ""
        resources: ["secrets"]
  - level: Metadata
""")
    p = load_policy(str(yaml_file))
    assert [r.level for r in p.rules] == [NONE, REQUEST_RESPONSE, METADATA]
    assert level(p, SECRET_GET) == REQUEST_RESPONSE and level(p, HEALTHZ) == NONE
    json_file = tmp_path / "policy.json"
    json_file.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                     "rules": [{"level": "Request", "verbs": ["create"]}]}))
    assert load_policy(str(json_file)).rules[0].verbs == {"create"}


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("document", "message"), [
    ({"kind": "Policy", "rules": [{"level": "None"}]}, "must have apiVersion: audit.k8s.io/v1 and kind: Policy"),
    ({"apiVersion": "audit.k8s.io/v1", "kind": "Policy"}, "rules: a policy needs at least one rule"),
    ({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": []}, "rules: a policy needs at least one rule"),
    ({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rule": []}, "rule: unknown field"),
    ({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": {"level": "None"}}, "rules: must be a list"),
    ({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["Done"], "rules": [{"level": "None"}]},
     "omitStages[0]: must be one of RequestReceived, ResponseStarted, ResponseComplete, Panic, not 'Done'"),
])
def test_bad_policies_are_refused_in_one_line(document, message):
    with pytest.raises(PolicyError) as refused:
        parse_policy(document)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


@pytest.mark.parametrize(("rule", "message"), [
    ({}, "rules[1].level: is required"),
    ({"level": "Full"}, "rules[1].level: must be one of None, Metadata, Request, RequestResponse, not 'Full'"),
    ({"level": "None", "verb": ["get"]}, "rules[1].verb: unknown field"),
    ({"level": "None", "verbs": "get"}, "rules[1].verbs: must be a list of non-empty strings"),
    ({"level": "None", "users": [""]}, "rules[1].users: must be a list of non-empty strings"),
    ({"level": "None", "verbs": ["get", "*"]}, "rules[1].verbs[1]: '*' is no wildcard in an audit policy"),
    ({"level": "None", "nonResourceURLs": ["healthz"]}, "rules[1].nonResourceURLs[0]: must begin with '/'"),
    ({"level": "None", "nonResourceURLs": ["/a/*/b"]}, "rules[1].nonResourceURLs[0]: '*' may only be the last"),
    ({"level": "None", "nonResourceURLs": ["/a"], "namespaces": ["x"]},
     "rules[1].nonResourceURLs: a rule cannot select both resources"),
    ({"level": "None", "resources": [{"apiGroups": ["apps"]}]},
     "rules[1].resources[0].apiGroups: unknown field (audit policies name it group, not apiGroups)"),
    ({"level": "None", "resources": [{"group": "Apps"}]}, "rules[1].resources[0].group: must be an API group name"),
    ({"level": "None", "resources": [{"resources": ["pods/log/x"]}]}, "rules[1].resources[0].resources[0]: must be RESOURCE"),
    ({"level": "None", "resources": [{"resources": ["po*"]}]}, "rules[1].resources[0].resources[0]: must be RESOURCE"),
    ({"level": "None", "resources": [{"resourceNames": ["x"]}]},
     "rules[1].resources[0].resourceNames: needs at least one resource"),
    ({"level": "None", "requestTargets": ["Cluster", "Space"]}, "rules[1].requestTargets[1]: must be one of Management"),
    ({"level": "None", "clusters": ["Prod"]}, "rules[1].clusters[0]: must be a cluster name or '*'"),
    ({"level": "None", "omitStages": ["Started"]}, "rules[1].omitStages[0]: must be one of"),
    ({"level": "None", "omitManagedFields": "yes"}, "rules[1].omitManagedFields: must be true or false"),
    ("Metadata", "rules[1]: must be an object"),
])
def test_bad_rules_are_refused_naming_the_rule_and_field(rule, message):
    with pytest.raises(PolicyError) as refused:
        policy({"level": "Metadata"}, rule)
    assert str(refused.value).startswith(message), str(refused.value)
    assert "\n" not in str(refused.value)


def test_an_unreadable_or_malformed_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot be read: No such file"):
        load_policy(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n  - level: None\n")
    with pytest.raises(PolicyError, match="is not valid YAML or JSON") as refused:
        load_policy(str(bad))
    assert "\n" not in str(refused.value)


# --- the [audit] table ---------------------------------------------------------------------------

def test_the_defaults(tmp_path):
    config = parse_audit_config({"path": str(tmp_path / "audit.log")})
    assert config == AuditConfig(path=str(tmp_path / "audit.log"), policy_file=None, max_size_mb=100.0, max_age_days=7.0,
                                 max_backups=5, compress=True, max_object_bytes=65536)
    assert config.policy is DEFAULT_POLICY
    assert parse_audit_config({"path": "-"}).path == "-"


def test_every_key(tmp_path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules: [{level: Request}]\n")
    config = parse_audit_config({"path": str(tmp_path / "a.log"), "policy_file": str(policy_file), "max_size_mb": 0.5,
                                 "max_age_days": 0, "max_backups": 0, "compress": False, "max_object_bytes": 1024})
    assert (config.max_size_mb, config.max_age_days, config.max_backups, config.compress, config.max_object_bytes) == \
        (0.5, 0.0, 0, False, 1024)
    assert config.policy.rules[0].level == REQUEST


@pytest.mark.parametrize(("table", "message"), [
    ({}, "audit.path: is required"),
    ({"path": ""}, "audit.path: must not be empty"),
    ({"path": "/nonexistent-folder/audit.log"}, "audit.path: folder not found"),
    ({"path": "{tmp}"}, "audit.path: {tmp} is a directory"),
    ({"path": "{tmp}/a.log", "max_size_mb": 0}, "audit.max_size_mb: must be > 0"),
    ({"path": "{tmp}/a.log", "max_size_mb": math.nan}, "audit.max_size_mb: must be a finite number, not nan"),
    ({"path": "{tmp}/a.log", "max_size_mb": math.inf}, "audit.max_size_mb: must be a finite number, not inf"),
    ({"path": "{tmp}/a.log", "max_age_days": math.nan}, "audit.max_age_days: must be a finite number"),
    ({"path": "{tmp}/a.log", "max_backups": -1}, "audit.max_backups: must be >= 0"),
    ({"path": "{tmp}/a.log", "max_age_days": "7d"}, "audit.max_age_days: must be a number"),
    ({"path": "{tmp}/a.log", "compress": "yes"}, "audit.compress: must be true or false"),
    ({"path": "{tmp}/a.log", "max_object_bytes": 0}, "audit.max_object_bytes: must be > 0"),
    ({"path": "{tmp}/a.log", "policy_file": "{tmp}/none.yaml"}, "audit.policy_file: file not found"),
    ({"path": "{tmp}/a.log", "policy_file": "{tmp}/bad.yaml"},
     "audit.policy_file: {tmp}/bad.yaml: rules[0].level: must be one of None, Metadata, Request, RequestResponse"),
    ({"path": "{tmp}/a.log", "max_size": 10}, "audit.max_size: unknown key"),
])
def test_bad_tables_are_one_line_naming_the_key(tmp_path, table, message):
    (tmp_path / "bad.yaml").write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules: [{level: Everything}]\n")
    table = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in table.items()}
    with pytest.raises(ConfigError) as refused:
        parse_audit_config(table)
    assert str(refused.value).startswith(message.format(tmp=tmp_path)), str(refused.value)
    assert "\n" not in str(refused.value)


def test_request_info_without_a_route_is_a_non_resource_request():
    # What the observer builds for requests refused before routing; no rule on resources matches it.
    p = policy({"level": "Metadata", "resources": [{"resources": ["*"]}]}, {"level": "Request", "nonResourceURLs": ["/*"]})
    assert level(p, RequestInfo(False, "/kubernetes/cluster/one/../x", "get"), target=None, cluster="") == REQUEST
