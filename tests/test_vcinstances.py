"""Following the store's virtual cluster instances, without sockets (tests/e2e has the rest)."""
from __future__ import annotations

import asyncio
import base64
from dataclasses import replace

import pytest

from devcluster.certs import ensure_credentials
from fastproxy.clusters import ClusterRegistry
from fastproxy.config import ClusterConfig, VirtualClusterConfig
from fastproxy.management import objects, schema
from fastproxy.store import Snapshot, VirtualClusterInstance
from fastproxy.vcinstances import InstanceFollower, direct_upstream, instance_config, instance_phase, plan_changes
from fastproxy.virtualclusters import VirtualClusters

VC1 = VirtualClusterInstance("team-a", "vc1", "prod", uid="u1", resource_version=3)
OWN = VirtualClusterInstance("team-a", "vc2", "prod", server="https://10.0.0.2:8443", token="vc2-token",
                             resource_version=4)


def snapshot(*instances: VirtualClusterInstance) -> Snapshot:
    return Snapshot(9, 0.0, 0.0, {}, {}, {}, frozenset(), {},
                    virtual_cluster_instances={(i.namespace, i.name): i for i in instances})


def test_phases():
    assert instance_phase(VC1, ["prod"], []) == ("Ready", "")
    assert instance_phase(VC1, ["prod"], [("prod", "team-a", "vc1")])[0] == "Shadowed"
    assert instance_phase(VC1, ["prod"], [("prod", "team-b", "vc1")])[0] == "Ready"
    assert instance_phase(VC1, ["dev"], []) == ("Failed", "the host cluster 'prod' is not one of the gateway's clusters")


def test_plan_changes():
    moved = replace(VC1, cluster="dev", resource_version=5)
    assert plan_changes({}, [VC1, OWN], []).put == (VC1, OWN)
    served = {("prod", "team-a", "vc1"): VC1, ("prod", "team-a", "vc2"): OWN}
    unchanged = plan_changes(served, [VC1, OWN], [])
    assert unchanged.put == () and unchanged.removed == ()
    # A new host is a new key: the old one goes, the new one comes.
    moved_plan = plan_changes(served, [moved, OWN], [])
    assert moved_plan.removed == (("prod", "team-a", "vc1"),) and moved_plan.put == (moved,)
    # The configuration's own wins: never served from the store, and dropped if it was.
    shadowed = plan_changes(served, [VC1, OWN], [("prod", "team-a", "vc2")])
    assert shadowed.removed == (("prod", "team-a", "vc2"),) and shadowed.put == ()


def test_instance_config_and_direct_upstream(tmp_path):
    assert instance_config(VC1) == VirtualClusterConfig("prod", "team-a", "vc1")
    server = instance_config(OWN).server
    assert server is not None and (server.name, server.host, server.port, server.token_file) == (
        "prod/team-a/vc2", "10.0.0.2", 8443, None)
    ca = base64.b64encode(ensure_credentials(tmp_path / "tls").ca_file.read_bytes()).decode()
    loop = asyncio.new_event_loop()
    try:
        upstream = direct_upstream(loop, replace(OWN, ca_data=ca), server)
        assert upstream.credential == b"Authorization: Bearer vc2-token\r\n"
        assert upstream.host_line == b"Host: 10.0.0.2:8443\r\n"
        upstream.pool.close()
    finally:
        loop.close()


@pytest.fixture
def follower():
    loop = asyncio.new_event_loop()
    hosts = ClusterRegistry(loop, [ClusterConfig("prod", "https", "10.0.0.1", 6443, insecure_skip_tls_verify=True)])
    virtual = VirtualClusters(loop, hosts, [VirtualClusterConfig("prod", "team-a", "configured")])
    ended: list = []
    follow = InstanceFollower(loop, virtual, [VirtualClusterConfig("prod", "team-a", "configured")], [], lambda: 0.0)
    follow.ended = ended.append  # type: ignore[method-assign]
    yield follow, virtual, ended
    virtual.close()
    hosts.close()
    loop.close()


def test_the_registry_follows_the_snapshots(follower):
    follow, virtual, ended = follower
    follow.follow(snapshot(VC1, OWN))
    via_host = virtual.upstream("prod", "team-a", "vc1")
    own = virtual.upstream("prod", "team-a", "vc2")
    assert via_host is not None and via_host.path_prefix == "/api/v1/namespaces/team-a/services/https:vc1:443/proxy"
    assert own is not None and own.credential == b"Authorization: Bearer vc2-token\r\n"
    follow.follow(snapshot(OWN))
    assert virtual.upstream("prod", "team-a", "vc1") is None and ended == [("prod", "team-a", "vc1")]
    assert virtual.upstream("prod", "team-a", "vc2") is own  # unchanged: the same handle
    # An instance named as the configured one changes nothing of it.
    follow.follow(snapshot(OWN, VirtualClusterInstance("team-a", "configured", "prod", server="https://evil.example")))
    configured = virtual.upstream("prod", "team-a", "configured")
    assert configured is not None and configured.path_prefix.endswith("https:configured:443/proxy")


def test_the_rendered_object_never_holds_the_token():
    rendered = objects.instance_object(OWN, "Ready", "")
    assert "vc2-token" not in str(rendered) and rendered["status"] == {"phase": "Ready", "hasToken": True}
    assert rendered["metadata"]["namespace"] == "team-a" and objects.object_key(rendered) == "team-a/vc2"
    body = {"spec": {"cluster": "prod", "token": "new"}, "metadata": {}}
    assert objects.instance_changes(body)["token"] == "new"
    assert "token" not in objects.instance_changes({"spec": {"cluster": "prod"}})


def test_discovery_and_openapi_say_namespaced():
    listed = {item["name"]: item for item in schema.api_resource_list()["resources"]}
    assert listed["virtualclusterinstances"]["namespaced"] is True and listed["users"]["namespaced"] is False
    aggregated = schema.aggregated_discovery()["items"][0]["versions"][0]["resources"]
    scopes = {item["resource"]: item["scope"] for item in aggregated}
    assert scopes["virtualclusterinstances"] == "Namespaced" and scopes["teams"] == "Cluster"
    paths = [path for path in schema._openapi_document()["paths"] if "virtualclusterinstances" in path]
    assert sorted(paths) == ["/apis/management.loft.sh/v1/namespaces/{namespace}/virtualclusterinstances",
                             "/apis/management.loft.sh/v1/namespaces/{namespace}/virtualclusterinstances/{name}",
                             "/apis/management.loft.sh/v1/virtualclusterinstances"]
