"""Per-request costs of identity and access: run with `pytest bench/micro --benchmark-enable`."""
from __future__ import annotations

import time

import pytest

from fastproxy.auth.requestinfo import request_info
from fastproxy.auth.scopes import check_scope, load_scope
from fastproxy.auth.tokens import KeySet, TokenVerifier, issue_token
from fastproxy.store import SqliteStore

SCOPE = {
    "clusters": [{"cluster": "staging"}],
    "rules": [
        {"verbs": ["get", "list", "watch"], "resources": [{"group": "", "resources": ["pods", "pods/log"]},
                                                          {"group": "apps", "resources": ["deployments"]}],
         "namespaces": ["dev", "qa"], "requestTargets": ["Cluster"], "cluster": "prod"},
        {"nonResourceURLs": ["/version", "/healthz*"]},
    ],
}


def test_request_info_named_get(benchmark):
    info = benchmark(request_info, "GET", "/api/v1/namespaces/dev/pods/web-0", "")
    assert info.verb == "get"


def test_request_info_watch(benchmark):
    info = benchmark(request_info, "GET", "/apis/apps/v1/namespaces/dev/deployments",
                     "allowWatchBookmarks=true&resourceVersion=12345&watch=true")
    assert info.verb == "watch"


def test_scope_check_rule_match(benchmark):
    scope = load_scope(SCOPE)
    info = request_info("GET", "/api/v1/namespaces/qa/pods/web-0/log", "")
    assert benchmark(check_scope, scope, info, "Cluster", "prod") is None


def test_scope_check_cluster_grant(benchmark):
    scope = load_scope(SCOPE)
    info = request_info("DELETE", "/api/v1/namespaces/qa/pods/web-0", "")
    assert benchmark(check_scope, scope, info, "Cluster", "staging") is None


def test_cached_token_verify(benchmark, tmp_path):
    keys = KeySet(tmp_path)
    token = issue_token(keys, issuer="gw", subject="alice", audience="prod", groups=["devs"], scope=SCOPE, ttl=3600)
    verifier = TokenVerifier(keys.jwks(), "gw")
    now = time.time()
    verifier.verify(token, "prod", now)

    def request():  # each request brings a new string, whose hash is not computed yet
        return (token[:8] + token[8:], "prod", now), {}
    verified = benchmark.pedantic(verifier.verify, setup=request, rounds=20_000, warmup_rounds=100)
    assert verified.identity.user == "alice"


@pytest.fixture
def snapshot_and_key(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    store.create_user("alice", groups=["devs"])
    secret = None
    for index in range(1000):
        _, key = store.create_access_key(user="alice", name=f"key-{index}")
        secret = secret or key
    snapshot = store.load_snapshot()
    store.close()
    return snapshot, secret


def test_snapshot_key_lookup(benchmark, snapshot_and_key):
    snapshot, secret = snapshot_and_key
    now = time.time()
    assert benchmark(snapshot.resolve, secret, now).identity.user == "alice"
