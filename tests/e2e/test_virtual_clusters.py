"""Virtual clusters through the real gateway process and the real kubectl: a second simulated
cluster runs as the virtual cluster, reached at its own URL and through the host cluster's
service proxy; the host decides with its storage.loft.sh/virtualclusters rules who may use it."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import subprocess
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from devcluster.certs import ensure_credentials
from devcluster.process import start_devcluster
from fastproxy.virtualclusters import DENIED_TTL
from tests.e2e.test_kubectl_through_gateway import KUBECTL, assert_echoed, free_port, read_line
from tests.e2e.test_management_api import cli, new_key
from tests.helpers import start_gateway

pytestmark = pytest.mark.e2e

POD = "web-5d4f8c7b9-h7k2m"
HOST_NAMESPACE = "vcluster-a"
# alice uses the virtual clusters, carol may also impersonate in them, dave counts reviews, bob may
# not use them; root administers the gateway.
KEYS = {name: f"vc-key-{name}-0123456789" for name in ("alice", "bob", "carol", "dave", "root")}
GROUPS = {"root": ["loft:admins"]}
# Where each context's server points: the same virtual cluster by both reach modes.
PATHS = {"proxied": f"/kubernetes/virtualcluster/host/{HOST_NAMESPACE}/vc1",
         "direct": f"/kubernetes/virtualcluster/host/{HOST_NAMESPACE}/vc-direct"}
# On the host, only alice may use the virtual clusters of the namespace.
HOST_RULES = [{"verbs": ["get"], "users": ["alice", "carol", "dave", "erin"], "apiGroups": ["storage.loft.sh"],
               "resources": ["virtualclusters"], "namespaces": [HOST_NAMESPACE]}]
# Inside the virtual cluster everyone may do anything but impersonate, which carol alone may.
VCLUSTER_RULES = [{"verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                   "groups": ["system:authenticated"], "resources": ["*"]},
                  {"verbs": ["impersonate"], "users": ["carol"], "resources": ["users", "groups"], "apiGroups": [""]}]


def _write_config(folder, host, vcluster, listen):
    tls = ensure_credentials(folder / "gateway-tls")
    for user, key in KEYS.items():
        (folder / f"{user}.key").write_text(key)
    config = f"""
        [server]
        listen = "{listen}"
        tls_cert_file = "{tls.server_cert_file}"
        tls_key_file = "{tls.server_key_file}"

        [state]
        path = "state.db"

        [[clusters]]
        name = "host"
        server = "{host.url}"
        ca_file = "{host.ca_file}"
        token_file = "{host.gateway_token_file}"

        [[virtual_clusters]]
        cluster = "host"
        namespace = "{HOST_NAMESPACE}"
        name = "vc1"

        [[virtual_clusters]]
        cluster = "host"
        namespace = "{HOST_NAMESPACE}"
        name = "vc-direct"
        server = "{vcluster.url}"
        ca_file = "{vcluster.ca_file}"
        token_file = "{vcluster.gateway_token_file}"
    """ + "".join(f"""
        [[access_keys]]
        name = "{user}"
        key_file = "{user}.key"
        user = "{user}"
        groups = {json.dumps(GROUPS.get(user, ["dev"]))}
    """ for user in KEYS)
    return tls, config


def _kubeconfig(folder, tls, port, users, paths=PATHS):
    """A context USER-MODE for every user and every gateway path (`paths`: mode -> path)."""
    clusters = "".join(f"""
        - name: {mode}
          cluster:
            server: https://127.0.0.1:{port}{path}
            certificate-authority: {tls.ca_file}""" for mode, path in paths.items())
    entries = "".join(f"""
        - name: {user}
          user:
            token: {key}""" for user, key in users.items())
    contexts = "".join(f"""
        - name: {user}-{mode}
          context:
            cluster: {mode}
            user: {user}
            namespace: team-a""" for user in users for mode in paths)
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:{clusters}
        users:{entries}
        contexts:{contexts}
        current-context: {next(iter(users))}-{next(iter(paths))}
    """))
    return kubeconfig


class Stack:
    def __init__(self, folder, host, vcluster, env, port):
        self.folder, self.host, self.vcluster, self.env, self.port = folder, host, vcluster, env, port

    def kubectl(self, context, *args, check=True, input=None, env=None):
        result = subprocess.run([KUBECTL, "--context", context, "--request-timeout=15s", *args],
                                env=env or self.env, input=input, capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def host_reviews(self, user):
        """The virtualclusters reviews for `user` the host cluster has answered (the devcluster keeps them)."""
        request = urllib.request.Request(f"{self.host.url}/devcluster/subjectaccessreviews",
                                         headers={"Authorization": f"Bearer {self.host.admin_token}"})
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=self.host.ca_file)) as answer:
            return [review for review in json.loads(answer.read()) if review.get("user") == user
                    and review.get("resourceAttributes", {}).get("resource") == "virtualclusters"]

    def request(self, path, *, user="alice", data=None, headers=(), port=None):
        """(status, JSON body) of a request of the user's straight to the gateway (or another on `port`)."""
        request = urllib.request.Request(f"https://127.0.0.1:{port or self.port}{path}", data=data,
                                         headers={"Authorization": f"Bearer {KEYS[user]}",
                                                  "Content-Type": "application/json", **dict(headers)})
        context = ssl.create_default_context(cafile=str(self.folder / "gateway-tls" / "ca.crt"))
        try:
            with urllib.request.urlopen(request, context=context) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@contextlib.contextmanager
def processes(folder, vclusters=("vc1",), config=lambda text: text):
    """The simulated virtual cluster, the host serving it as each of `vclusters` (services in
    HOST_NAMESPACE) and the gateway on `config(_write_config's text)`: (host, vcluster, gateway, tls);
    the virtual cluster holds a configmap of its own, only-in-vcluster in team-a."""
    vcluster = start_devcluster(folder / "vcluster", rules=VCLUSTER_RULES)
    host = gateway = None
    try:
        host = start_devcluster(folder / "host", rules=HOST_RULES,
                                services={f"{HOST_NAMESPACE}/{name}": vcluster.directory for name in vclusters})
        tls, text = _write_config(folder, host, vcluster, f"127.0.0.1:{free_port()}")
        gateway = start_gateway(config(text), folder)
        direct = subprocess.run([KUBECTL, "--server", vcluster.url, "--certificate-authority", str(vcluster.ca_file),
                                 "--token", vcluster.admin_token, "create", "configmap", "only-in-vcluster",
                                 "-n", "team-a", "--from-literal=where=vcluster"],
                                env={**os.environ, "KUBECONFIG": "/dev/null", "HOME": str(folder)},
                                capture_output=True, text=True, timeout=30)
        assert direct.returncode == 0, direct.stderr
        yield host, vcluster, gateway, tls
    finally:
        if gateway is not None:
            gateway.stop()
        if host is not None:
            host.stop()
        vcluster.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vclusters")
    with processes(folder) as (host, vcluster, gateway, tls):
        scoped = folder / "scope.json"
        # A key whose scope names another virtual cluster only.
        scoped.write_text(json.dumps({"rules": [{"requestTargets": ["VirtualCluster"],
                                                 "virtualClusters": [{"name": "other", "namespace": HOST_NAMESPACE}]}]}))
        cli(folder / "fastproxy.toml", "user", "create", "erin")
        scoped_key = new_key(folder / "fastproxy.toml", "erin", "--scope", str(scoped))
        # ...and one that may read configmaps in vc1 only.
        scoped.write_text(json.dumps({"rules": [{
            "requestTargets": ["VirtualCluster"], "verbs": ["get", "list"], "resources": [{"resources": ["configmaps"]}],
            "virtualClusters": [{"name": "vc1", "namespace": HOST_NAMESPACE}]}]}))
        narrow_key = new_key(folder / "fastproxy.toml", "erin", "--scope", str(scoped))
        _kubeconfig(folder, tls, gateway.port, {**KEYS, "scoped": scoped_key, "narrow": narrow_key})
        env = {**os.environ, "KUBECONFIG": str(folder / "kubeconfig"), "HOME": str(folder)}
        yield Stack(folder, host, vcluster, env, gateway.port)


@pytest.mark.parametrize("mode", PATHS)
def test_get_reaches_the_virtual_cluster(stack, mode):
    names = stack.kubectl(f"alice-{mode}", "get", "configmaps", "-o", "name").stdout.split()
    assert "configmap/only-in-vcluster" in names


@pytest.mark.parametrize("mode", PATHS)
def test_the_virtual_cluster_sees_the_impersonated_user(stack, mode):
    who = json.loads(stack.kubectl(f"alice-{mode}", "auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert who["username"] == "alice" and "dev" in who["groups"]


@pytest.mark.parametrize("mode", PATHS)
def test_client_impersonation_is_reviewed_on_the_virtual_cluster(stack, mode):
    # The gateway may impersonate anyone there: had the client's Impersonate-* headers gone through
    # unreviewed, the virtual cluster would take alice for system:admin.
    refused = stack.kubectl(f"alice-{mode}", "--as", "system:admin", "--as-group", "system:masters",
                            "get", "configmaps", check=False)
    assert refused.returncode != 0 and "may not impersonate" in refused.stderr, refused.stderr
    assert f"on cluster 'host/{HOST_NAMESPACE}/" in refused.stderr
    # Its own rules let carol impersonate: nested impersonation reaches it.
    jane = json.loads(stack.kubectl(f"carol-{mode}", "--as", "jane", "auth", "whoami", "-o", "json").stdout)
    assert jane["status"]["userInfo"]["username"] == "jane"


@pytest.mark.parametrize("mode", PATHS)
def test_the_clients_credential_never_reaches_it(stack, mode):
    review = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
    path = f"{PATHS[mode]}/apis/authentication.k8s.io/v1/selfsubjectreviews"
    # alice's key is unknown to the virtual cluster (a 401 there): it sees the gateway, acting as alice.
    code, answer = stack.request(path, data=review)
    assert code == 201 and answer["status"]["userInfo"]["username"] == "alice"
    code, answer = stack.request(path, data=review, headers={"Impersonate-User": "system:admin"})
    assert code == 403 and "may not impersonate" in answer["message"]


@pytest.mark.parametrize("mode", PATHS)
def test_watch_streams(stack, mode):
    watch = subprocess.Popen([KUBECTL, "--context", f"alice-{mode}", "get", "configmaps", "-w", "--output-watch-events",
                              "-o", "custom-columns=EVENT:.type,NAME:.object.metadata.name"],
                             env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    name = f"watched-{mode}"
    try:
        assert read_line(watch, 10).split() == ["EVENT", "NAME"]
        seen = {tuple(read_line(watch, 5).split()) for _ in range(3)}  # team-a's configmaps
        assert ("ADDED", "only-in-vcluster") in seen
        stack.kubectl(f"alice-{mode}", "create", "configmap", name)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if read_line(watch, 5).split() == ["ADDED", name]:
                break
        else:
            pytest.fail("the watch did not see the new configmap")
    finally:
        watch.kill()
        watch.wait()
        stack.kubectl(f"alice-{mode}", "delete", "configmap", name, check=False)


@pytest.mark.parametrize("mode", PATHS)
def test_logs_follow_streams(stack, mode):
    follow = subprocess.Popen([KUBECTL, "--context", f"alice-{mode}", "logs", "-f", POD], env=stack.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = [read_line(follow, 10) for _ in range(3)]
        assert all(line.startswith(f"{POD}/nginx: log line") for line in lines), lines
        assert follow.poll() is None  # still following
    finally:
        follow.kill()
        follow.wait()


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("websockets", ["true", "false"])
def test_exec(stack, mode, websockets):
    env = {**stack.env, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets}
    assert stack.kubectl(f"alice-{mode}", "exec", POD, "--", "echo", "in", "vcluster", env=env).stdout == "in vcluster\n"
    echoed = stack.kubectl(f"alice-{mode}", "exec", "-i", POD, "--", "cat", input="one\ntwo\n", env=env)
    assert echoed.stdout == "one\ntwo\n"


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("websockets", ["true", "false"])
def test_port_forward(stack, mode, websockets):
    port = free_port()
    forward = subprocess.Popen([KUBECTL, "--context", f"alice-{mode}", "port-forward", f"pod/{POD}", f"{port}:80"],
                               env={**stack.env, "KUBECTL_PORT_FORWARD_WEBSOCKETS": websockets},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert "Forwarding from 127.0.0.1" in read_line(forward, 10)
        assert_echoed(port, b"through a virtual cluster\n" * 500)
    finally:
        forward.kill()
        forward.wait()


@pytest.mark.parametrize("mode", PATHS)
def test_a_caller_without_the_host_rule_is_forbidden(stack, mode):
    refused = stack.kubectl(f"bob-{mode}", "get", "configmaps", check=False)
    assert refused.returncode == 1, refused.stderr
    assert ('virtualclusters.storage.loft.sh "' in refused.stderr and 'User "bob" cannot get resource "virtualclusters"'
            in refused.stderr and f'in the namespace "{HOST_NAMESPACE}"' in refused.stderr), refused.stderr


def test_a_scope_without_the_virtual_cluster_is_refused(stack):
    refused = stack.kubectl("scoped-proxied", "get", "configmaps", check=False)
    assert refused.returncode == 1 and "access key scope does not allow" in refused.stderr, refused.stderr
    assert f"virtual cluster {HOST_NAMESPACE}/vc1 on cluster 'host'" in refused.stderr


def test_a_scope_naming_the_virtual_cluster_allows_what_it_lists(stack):
    # kubectl discovers the API first: allowed, as the scope reaches this virtual cluster.
    names = stack.kubectl("narrow-proxied", "get", "configmaps", "-o", "name").stdout.split()
    assert "configmap/only-in-vcluster" in names
    for args in (("get", "pods"), ("delete", "configmap", "only-in-vcluster")):
        refused = stack.kubectl("narrow-proxied", *args, check=False)
        assert refused.returncode == 1 and "access key scope does not allow" in refused.stderr, refused.stderr
    other = stack.kubectl("narrow-direct", "get", "configmaps", check=False)
    assert other.returncode == 1 and f"virtual cluster {HOST_NAMESPACE}/vc-direct" in other.stderr, other.stderr


def test_an_unknown_virtual_cluster_is_not_found(stack):
    code, answer = stack.request(f"/kubernetes/virtualcluster/host/{HOST_NAMESPACE}/nope/api")
    assert code == 404 and answer["message"] == f'virtual cluster "{HOST_NAMESPACE}/nope" not found on cluster "host"'


def test_the_host_review_is_cached(stack):
    assert stack.host_reviews("dave") == []
    for _ in range(5):
        stack.kubectl("dave-proxied", "get", "configmap", "only-in-vcluster")
    reviews = stack.host_reviews("dave")
    assert len(reviews) == 1  # five requests, one review: the answer is kept
    assert reviews[0]["resourceAttributes"] == {"verb": "get", "group": "storage.loft.sh",
                                                "resource": "virtualclusters", "namespace": HOST_NAMESPACE,
                                                "name": "vc1"}
    assert "dev" in reviews[0]["groups"]


def test_a_refusal_is_cached_briefly(stack):
    def asked():
        return len([review for review in stack.host_reviews("bob") if review["resourceAttributes"]["name"] == "vc1"])

    def refused():
        return stack.request(f"{PATHS['proxied']}/api/v1/namespaces", user="bob")[0] == 403
    time.sleep(DENIED_TTL + 0.2)  # whatever earlier tests left has expired
    before = asked()
    assert refused() and refused()
    assert asked() == before + 1  # the second refusal reused the first answer
    time.sleep(DENIED_TTL + 0.2)
    assert refused() and asked() == before + 2  # asked again once it expired


def test_sleep_mode_activity_names_the_virtual_cluster(stack):
    stack.kubectl("alice-direct", "get", "configmap", "only-in-vcluster")
    path = f"/kubernetes/management/apis/management.loft.sh/v1/namespaceactivities/host.{HOST_NAMESPACE}"
    expected = {"subject": "alice", "verb": "get", "resource": "configmaps", "name": "only-in-vcluster",
                "virtualCluster": "vc-direct"}
    deadline = time.monotonic() + 10  # written in batches every few seconds
    while True:
        code, activity = stack.request(path, user="root")
        if code == 200 and activity["status"]["lastActivityInfo"] == expected:
            break
        assert time.monotonic() < deadline, activity
        time.sleep(0.25)
    assert activity["spec"] == {"cluster": "host", "namespace": HOST_NAMESPACE}


def test_limits_count_virtual_cluster_requests_with_the_identitys_others(tmp_path):
    """[limits] holds for the virtual-cluster route too: a watch there and one on the host cluster
    are both alice's, so with watches_per_identity = 1 either one refuses the other."""
    limits = "\n[limits]\nwatches_per_identity = 1\nretry_after = 2\n"
    with processes(tmp_path, config=lambda text: text + limits) as (_, _, gateway, tls):
        context = ssl.create_default_context(cafile=str(tls.ca_file))

        def watch(path: str) -> http.client.HTTPSConnection:
            connection = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=context, timeout=20)
            connection.request("GET", f"{path}/api/v1/namespaces/team-a/configmaps?watch=1",
                               headers={"Authorization": f"Bearer {KEYS['alice']}"})
            return connection

        first = watch(PATHS["proxied"])
        assert first.getresponse().status == 200
        for path in (PATHS["direct"], "/kubernetes/cluster/host"):
            refused = watch(path)
            response = refused.getresponse()
            status = json.loads(response.read())
            assert response.status == 429 and response.getheader("Retry-After") == "2", status
            assert "(limits.watches_per_identity = 1)" in status["message"]
            refused.close()
        first.close()
        deadline = time.monotonic() + 10
        while True:  # the gateway sees the watch end and gives its place back
            again = watch(PATHS["direct"])
            code = again.getresponse().status
            again.close()
            if code == 200:
                break
            assert code == 429 and time.monotonic() < deadline, code
            time.sleep(0.1)
