"""The virtual cluster handler's decisions and registry, without sockets (tests/e2e has the rest)."""
from __future__ import annotations

import asyncio
import os

import pytest

from fastproxy.auth.identity import Identity
from fastproxy.clusters import ClusterRegistry
from fastproxy.config import ClusterConfig, VirtualClusterConfig
from fastproxy.routing import route
from fastproxy.upstream_client import UpstreamRequestError
from fastproxy.virtualclusters import (
    ServiceProxyUpstream,
    VirtualClusters,
    access_check,
    access_refusal,
    service_proxy_path,
)

ALICE = Identity("alice", ("dev",), "alice-key", b"")
ROUTE = route("/kubernetes/virtualcluster/prod/team-a/vc1/api/v1/pods")


def test_the_host_is_asked_for_get_virtualclusters_in_the_namespace():
    check = access_check("team-a", "vc1")
    assert (check.verb, check.group, check.resource, check.namespace, check.name) == (
        "get", "storage.loft.sh", "virtualclusters", "team-a", "vc1")
    assert service_proxy_path("team-a", "vc1") == "/api/v1/namespaces/team-a/services/https:vc1:443/proxy"


@pytest.fixture
def answered():
    loop = asyncio.new_event_loop()

    def answer(result=None, error=None):
        future = loop.create_future()
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
        return future
    yield answer
    loop.close()


def test_what_the_hosts_answer_makes_of_the_request(answered):
    assert access_refusal(answered((True, "")), "prod", ALICE, ROUTE) is None
    denied = access_refusal(answered((False, "no binding")), "prod", ALICE, ROUTE)
    assert denied.code == 403 and denied.message == (
        'virtualclusters.storage.loft.sh "vc1" is forbidden: User "alice" cannot get resource "virtualclusters" '
        'in API group "storage.loft.sh" in the namespace "team-a" on cluster \'prod\': no binding')
    # No answer refuses too: with the host's own failure code, or 403 for an answer that is none.
    unreachable = access_refusal(answered(error=UpstreamRequestError(503, 'cluster "prod" is unreachable')),
                                 "prod", ALICE, ROUTE)
    assert unreachable.code == 503 and "cannot be checked on cluster 'prod'" in unreachable.message
    garbled = access_refusal(answered(error=ValueError("the answer has no status")), "prod", ALICE, ROUTE)
    assert garbled.code == 403 and garbled.message.endswith("the answer has no status")


@pytest.fixture
def registry(tmp_path):
    token = tmp_path / "token"
    token.write_text("host-token\n")
    loop = asyncio.new_event_loop()
    host = ClusterConfig("prod", "https", "10.0.0.1", 6443, insecure_skip_tls_verify=True, token_file=str(token))
    hosts = ClusterRegistry(loop, [host])
    direct = VirtualClusterConfig("prod", "team-a", "vc2", ClusterConfig(
        "prod/team-a/vc2", "https", "10.0.0.2", 8443, insecure_skip_tls_verify=True, token_file=str(token)))
    virtual = VirtualClusters(loop, hosts, [VirtualClusterConfig("prod", "team-a", "vc1"), direct])
    yield hosts, virtual, host, token
    virtual.close()
    hosts.close()
    loop.close()


def test_a_virtual_cluster_without_a_url_is_reached_through_its_hosts_pool(registry):
    hosts, virtual, _, _ = registry
    via = virtual.upstream("prod", "team-a", "vc1")
    assert isinstance(via, ServiceProxyUpstream) and via.pool is hosts.get("prod").pool
    assert via.path_prefix == "/api/v1/namespaces/team-a/services/https:vc1:443/proxy"
    assert via.cluster.name == "prod/team-a/vc1" and via.host_line == b"Host: 10.0.0.1:6443\r\n"
    assert via.credential == b"Authorization: Bearer host-token\r\n"
    assert virtual.upstream("prod", "team-a", "vc1") is via  # kept while the host stays the same


def test_a_virtual_cluster_with_a_url_has_its_own_pool(registry):
    hosts, virtual, _, _ = registry
    direct = virtual.upstream("prod", "team-a", "vc2")
    assert direct.path_prefix == "" and direct.pool is not hosts.get("prod").pool
    assert direct.host_line == b"Host: 10.0.0.2:8443\r\n"
    assert virtual.upstream("prod", "team-a", "vc3") is None and virtual.upstream("prod", "team-b", "vc1") is None


def test_the_service_proxy_follows_the_host(registry, tmp_path):
    hosts, virtual, host, token = registry
    before = virtual.upstream("prod", "team-a", "vc1")
    token.write_text("rotated\n")
    os.utime(token, (1, 1))  # a new mtime, as a rotation gives
    hosts.tick()
    rotated = virtual.upstream("prod", "team-a", "vc1")
    assert rotated is not before and rotated.credential == b"Authorization: Bearer rotated\r\n"
    hosts.put(ClusterConfig("prod", "https", "10.0.0.9", 6443, insecure_skip_tls_verify=True, token_file=str(token)))
    moved = virtual.upstream("prod", "team-a", "vc1")
    assert moved.host_line == b"Host: 10.0.0.9:6443\r\n" and moved.pool is hosts.get("prod").pool
    hosts.remove("prod")
    assert virtual.upstream("prod", "team-a", "vc1") is None


def test_virtual_clusters_can_be_replaced_and_removed(registry):
    _, virtual, _, token = registry
    moved = VirtualClusterConfig("prod", "team-a", "vc1", ClusterConfig(
        "prod/team-a/vc1", "https", "10.0.0.3", 443, insecure_skip_tls_verify=True, token_file=str(token)))
    virtual.put(moved)
    assert virtual.upstream("prod", "team-a", "vc1").host_line == b"Host: 10.0.0.3\r\n"
    virtual.remove(moved)
    assert virtual.upstream("prod", "team-a", "vc1") is None
