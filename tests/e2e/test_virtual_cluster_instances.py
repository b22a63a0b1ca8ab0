"""Virtual clusters created in the management API (virtualclusterinstances), through the real gateway
process and the real kubectl: an admin creates, applies, watches and deletes them; alice then uses
the virtual cluster (a second simulated cluster) through the gateway, by both reach modes, until it
is deleted. A virtual cluster of the configuration wins over an instance of the same name."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_kubectl_through_gateway import KUBECTL, free_port, read_line
from tests.e2e.test_virtual_clusters import HOST_NAMESPACE as NS
from tests.e2e.test_virtual_clusters import KEYS, _kubeconfig, processes
from tests.e2e.test_virtual_clusters import Stack as VirtualClustersStack
from tests.helpers import start_gateway

pytestmark = pytest.mark.e2e

# Virtual clusters alice reaches through the gateway (vc1 is configured, the others are instances); each
# is a service of the host (the simulated vcluster behind it) in NS, the namespace HOST_RULES let alice
# use virtual clusters in, so the service-proxy mode works for every one.
VCLUSTERS = ("vc-store", "vc-applied", "vc-own", "vc1", "vc-watched")
USERS = ("root", "alice")  # root is an admin (loft:admins), alice is not


def instance_yaml(name: str, namespace: str = NS, **spec: str) -> str:
    return json.dumps({"apiVersion": "management.loft.sh/v1", "kind": "VirtualClusterInstance",
                       "metadata": {"name": name, "namespace": namespace},
                       "spec": {"cluster": "host", **spec}})


class Stack(VirtualClustersStack):
    def admin(self, *args: str, **kwargs):
        return self.kubectl("root-management", *args, **kwargs)

    def status(self, vcluster: str) -> tuple[int, dict]:
        """(code, body) of alice's list of configmaps in the virtual cluster, straight to the gateway."""
        return self.request(f"/kubernetes/virtualcluster/host/{NS}/{vcluster}/api/v1/namespaces/team-a/configmaps")

    def configmaps(self, vcluster: str, check: bool = True):
        return self.kubectl(f"alice-{vcluster}", "get", "configmaps", "-n", "team-a", "-o", "name", check=check)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vcinstances")
    # Watches through a deleted instance end at once rather than spread over the default period.
    with processes(folder, VCLUSTERS, lambda text: text.replace(
            "[server]", "[server]\n        watch_termination_period = 0.5", 1)) as (host, vcluster, gateway, tls):
        paths = {"management": "/kubernetes/management",
                 **{name: f"/kubernetes/virtualcluster/host/{NS}/{name}" for name in VCLUSTERS}}
        kubeconfig = _kubeconfig(folder, tls, gateway.port, {user: KEYS[user] for user in USERS}, paths)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(folder)}
        yield Stack(folder, host, vcluster, env, gateway.port)


def test_discovery_says_namespaced(stack):
    listed = stack.admin("api-resources", "--api-group", "management.loft.sh", "--namespaced=true", "-o", "name").stdout
    assert listed.split() == ["virtualclusterinstances.management.loft.sh"]
    explained = stack.admin("explain", "virtualclusterinstances.spec").stdout
    assert "server" in explained and "Write-only" in explained


def test_create_use_delete_through_the_service_proxy(stack):
    code, refused = stack.status("vc-store")
    assert code == 404 and refused["message"] == 'virtual cluster "vcluster-a/vc-store" not found on cluster "host"'
    assert stack.admin("create", "-f", "-", input=instance_yaml("vc-store")).stdout.strip() == \
        "virtualclusterinstance.management.loft.sh/vc-store created"
    rows = stack.admin("get", "virtualclusterinstances", "-n", NS).stdout.splitlines()
    assert rows[0].split() == ["NAME", "CLUSTER", "SERVER", "PHASE", "AGE"]
    assert rows[1].split()[:6] == ["vc-store", "host", "<host", "service", "proxy>", "Ready"]
    # Served at once: the create answers once this worker's snapshot holds it.
    assert "configmap/only-in-vcluster" in stack.configmaps("vc-store").stdout.split()
    # The host still decides who may use it: root administers the gateway, not the host's namespace.
    code, refused = stack.request(f"/kubernetes/virtualcluster/host/{NS}/vc-store/api/v1/namespaces", user="root")
    assert code == 403 and 'User "root" cannot get resource "virtualclusters"' in refused["message"]
    # A dry run of another one writes nothing.
    stack.admin("create", "--dry-run=server", "-f", "-", input=instance_yaml("vc-dry"))
    assert "vc-dry" not in stack.admin("get", "vci", "-n", NS, "-o", "name").stdout
    assert stack.admin("delete", "vci", "vc-store", "-n", NS).stdout.strip() == \
        'virtualclusterinstance.management.loft.sh "vc-store" deleted'
    code, gone = stack.status("vc-store")
    assert code == 404 and gone["kind"] == "Status" and "not found" in gone["message"]
    # (kubectl then looks the namespace up in the core group, which the management API does not serve,
    # and words the refusal after that.)
    missing = stack.admin("get", "vci", "vc-store", "-n", NS, check=False)
    assert missing.returncode != 0 and "(NotFound)" in missing.stderr


def test_apply_and_list_across_namespaces(stack):
    stack.admin("create", "-f", "-", input=instance_yaml("elsewhere", namespace="other-ns"))
    applied = instance_yaml("vc-applied", description="first")
    assert stack.admin("apply", "-f", "-", input=applied).stdout.strip().endswith("vc-applied created")
    changed = instance_yaml("vc-applied", description="second")
    assert stack.admin("apply", "-f", "-", input=changed).stdout.strip().endswith("vc-applied configured")
    stored = json.loads(stack.admin("get", "vci", "vc-applied", "-n", NS, "-o", "json").stdout)
    assert stored["spec"]["description"] == "second" and stored["metadata"]["namespace"] == NS
    everywhere = [line.split()[:2] for line in stack.admin("get", "vci", "-A").stdout.splitlines()]
    assert everywhere[0] == ["NAMESPACE", "NAME"] and ["other-ns", "elsewhere"] in everywhere
    assert [NS, "vc-applied"] in everywhere
    # One namespace shows only its own; the other's is not found there.
    assert "elsewhere" not in stack.admin("get", "vci", "-n", NS, "-o", "name").stdout
    assert stack.admin("get", "vci", "elsewhere", "-n", NS, check=False).returncode != 0
    assert "configmap/only-in-vcluster" in stack.configmaps("vc-applied").stdout.split()
    stack.admin("delete", "vci", "elsewhere", "-n", "other-ns")
    # A host that is no cluster of the gateway: kept, but Failed.
    stack.admin("create", "-f", "-", input=instance_yaml("unhosted", cluster="nowhere"))
    failed = json.loads(stack.admin("get", "vci", "unhosted", "-n", NS, "-o", "json").stdout)["status"]
    assert failed["phase"] == "Failed" and "'nowhere' is not one of the gateway's clusters" in failed["message"]
    stack.admin("delete", "vci", "unhosted", "-n", NS)
    stack.admin("delete", "-f", "-", input=changed)


def test_own_server_with_a_token_that_is_never_returned(stack):
    token = Path(stack.vcluster.gateway_token_file).read_text().strip()
    ca = base64.b64encode(Path(stack.vcluster.ca_file).read_bytes()).decode()
    body = instance_yaml("vc-own", server=stack.vcluster.url, caData=ca, token=token)
    stack.admin("create", "-f", "-", input=body)
    assert "configmap/only-in-vcluster" in stack.configmaps("vc-own").stdout.split()
    shown = stack.admin("get", "vci", "vc-own", "-n", NS, "-o", "yaml").stdout
    assert token not in shown and "hasToken: true" in shown
    listed = stack.admin("get", "vci", "-A", "-o", "json").stdout
    assert token not in listed
    # kubectl apply would keep the token in its annotation, which is shown: refused.
    refused = stack.admin("apply", "-f", "-", input=body.replace("vc-own", "vc-own-2"), check=False)
    assert refused.returncode != 0 and "would keep spec.token in clear" in refused.stderr
    assert token not in refused.stderr
    # An update without the token keeps it.
    stack.admin("patch", "vci", "vc-own", "-n", NS, "--type=merge", "-p", '{"spec":{"description":"own"}}')
    assert "configmap/only-in-vcluster" in stack.configmaps("vc-own").stdout.split()
    stack.admin("delete", "vci", "vc-own", "-n", NS)
    assert stack.configmaps("vc-own", check=False).returncode != 0


def test_a_token_without_a_server_or_a_plain_http_server_is_invalid(stack):
    no_server = stack.admin("create", "-f", "-", input=instance_yaml("bad", token="abc"), check=False)
    assert no_server.returncode != 0 and "caData and token need a server" in no_server.stderr
    plain = stack.admin("create", "-f", "-", input=instance_yaml("bad", server="http://127.0.0.1:1"), check=False)
    assert plain.returncode != 0 and "is not an https URL" in plain.stderr
    elsewhere = stack.admin("create", "-n", "other-ns", "-f", "-", input=instance_yaml("bad"), check=False)
    assert elsewhere.returncode != 0 and "does not match the namespace" in elsewhere.stderr
    assert stack.admin("get", "vci", "-A", "-o", "name").stdout.strip() == ""


def test_only_admins_write_or_read(stack):
    refused = stack.kubectl("alice-management", "create", "-f", "-", input=instance_yaml("vc-store"), check=False)
    assert refused.returncode != 0
    assert ('User "alice" cannot create resource "virtualclusterinstances" in API group "management.loft.sh" '
            'in the namespace "vcluster-a"') in refused.stderr
    listing = stack.kubectl("alice-management", "get", "vci", "-A", check=False)
    assert listing.returncode != 0 and "forbidden" in listing.stderr
    assert stack.configmaps("vc-store", check=False).returncode != 0  # nothing was created


def test_the_configuration_wins_a_clash(stack):
    # The configured vc1 goes through the host's service proxy; the instance would send it elsewhere.
    body = instance_yaml("vc1", server="https://127.0.0.1:1")
    stack.admin("create", "-f", "-", input=body)
    try:
        shown = json.loads(stack.admin("get", "vci", "vc1", "-n", NS, "-o", "json").stdout)
        assert shown["status"]["phase"] == "Shadowed"
        assert "configmap/only-in-vcluster" in stack.configmaps("vc1").stdout.split()
    finally:
        stack.admin("delete", "vci", "vc1", "-n", NS)
    assert "configmap/only-in-vcluster" in stack.configmaps("vc1").stdout.split()


def test_watch_shows_the_events_and_a_deleted_one_ends_its_streams(stack):
    events = subprocess.Popen([KUBECTL, "--context", "root-management", "get", "vci", "-n", NS, "-w",
                               "--output-watch-events", "-o", "custom-columns=EVENT:.type,NAME:.object.metadata.name"],
                              env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    streamed = None
    try:
        stack.admin("create", "-f", "-", input=instance_yaml("vc-watched"))
        # The header comes with the first event (the namespace may have had no instance before).
        assert read_line(events, 10).split() == ["EVENT", "NAME"]
        assert read_line(events, 10).split() == ["ADDED", "vc-watched"]
        # alice watches configmaps inside it; deleting the instance ends that stream.
        streamed = subprocess.Popen([KUBECTL, "--context", "alice-vc-watched", "get", "configmaps", "-n", "team-a",
                                     "-w", "-o", "name"], env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        listed = {read_line(streamed, 10).strip() for _ in range(3)}  # team-a's configmaps
        assert "configmap/only-in-vcluster" in listed
        stack.admin("delete", "vci", "vc-watched", "-n", NS)
        assert read_line(events, 10).split() == ["DELETED", "vc-watched"]
        started = time.monotonic()
        streamed.wait(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        for process in (events, streamed):
            if process is not None:
                process.kill()
                process.wait()


def test_every_worker_of_another_gateway_follows_the_store(stack, tmp_path):
    """A second gateway of two workers on the same state file: an instance created through the first
    is served by both of its workers within a poll, and refused by both once deleted."""
    text = (stack.folder / "fastproxy.toml").read_text()
    text = text.replace('path = "state.db"', f'path = "{stack.folder / "state.db"}"')
    for user in KEYS:
        text = text.replace(f'key_file = "{user}.key"', f'key_file = "{stack.folder / user}.key"')
    listen = text.split('listen = "', 1)[1].split('"', 1)[0]
    port = free_port()
    other = start_gateway(text.replace(f'listen = "{listen}"', f'listen = "127.0.0.1:{port}"\nworkers = 2'), tmp_path)
    path = f"/kubernetes/virtualcluster/host/{NS}/vc-store/api/v1/namespaces/team-a/configmaps"

    def codes() -> set[int]:
        # A new connection each time: SO_REUSEPORT spreads them over both workers (all 20 on one: p < 1e-5).
        return {stack.request(path, port=port)[0] for _ in range(20)}
    try:
        assert codes() == {404}
        stack.admin("create", "-f", "-", input=instance_yaml("vc-store"))
        time.sleep(0.6)  # the other gateway's workers' next poll
        assert codes() == {200}
        stack.admin("delete", "vci", "vc-store", "-n", NS)
        time.sleep(0.6)
        assert codes() == {404}
    finally:
        other.stop()
