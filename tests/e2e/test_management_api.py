"""The management API through the real gateway process: the seeds' curl examples, kubectl, the
official Python client, Direct Cluster Endpoint tokens on an edge gateway, refusals and hostile bodies."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from devcluster.process import start_devcluster
from fastproxy.demo import CLUSTER, VIEWER_RULES, prepare
from tests.e2e.test_kubectl_through_gateway import free_port, read_line
from tests.helpers import start_gateway

KUBECTL = "/usr/bin/kubectl"
GROUP_PATH = "/kubernetes/management/apis/management.loft.sh/v1"
pytestmark = pytest.mark.e2e

SELF_YAML = textwrap.dedent("""\
    apiVersion: management.loft.sh/v1
    kind: Self
    metadata:
      creationTimestamp: null
    spec: {}
    status:
      accessKey: my-access-key
      accessKeyType: Login
      groups:
      - loft:admins
      - system:authenticated
      - loft:authenticated
      - loft:user:*
      - loft:user:admin
      subject: admin
""")

SEED_TOKEN = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjV3RlZOcmU1Ty1ZazBMRmNoN3F1NzVlYlctdk5rdGJ5eTRlelJNQ3dKLVEifQ."
              "eyJhdWQiOlsiaHR0cHM6V0ZXMuZGVmYXVsdCJdLCJleHAiOjE5ODMwNzXIubG")
TOKEN_YAML = textwrap.dedent(f"""\
    apiVersion: management.loft.sh/v1
    kind: DirectClusterEndpointToken
    metadata:
      creationTimestamp: null
    spec: {{}}
    status:
      token: {SEED_TOKEN}
""")


SELF = json.dumps({"apiVersion": "management.loft.sh/v1", "kind": "Self"}).encode()
WHOAMI = f"/kubernetes/cluster/{CLUSTER}/apis/authentication.k8s.io/v1/selfsubjectreviews"
REVIEW = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()


def token_request(**spec) -> bytes:
    return json.dumps({"apiVersion": "management.loft.sh/v1", "kind": "DirectClusterEndpointToken", "spec": spec}).encode()


def cli(config: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fastproxy", *args, "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def new_key(config: Path, user: str, *extra: str) -> str:
    out = cli(config, "accesskey", "create", "--user", user, *extra)
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("key: "))


# A key for one cluster that may also mint keys and tokens (never wider than itself) and ask who it is.
SCOPE = {"clusters": [{"cluster": CLUSTER}],
         "rules": [{"verbs": ["create"], "requestTargets": ["Management"], "resources": [
             {"group": "management.loft.sh", "resources": ["selves", "directclusterendpointtokens", "ownedaccesskeys"]}]}]}


class Stack:
    def __init__(self, folder: Path, config: Path, url: str, ca: str, admin_key: str, jane_key: str, scoped_key: str):
        self.folder, self.config, self.url, self.ca = folder, config, url, ca
        self.admin_key, self.jane_key, self.scoped_key = admin_key, jane_key, scoped_key

    def curl(self, method: str, path: str, *, key: str | None = None, data: bytes | None = None,
             content_type: str = "application/json", accept: str | None = None) -> tuple[int, dict]:
        args = ["curl", "-s", "-X", method, "--cacert", self.ca, "-o", "-", "-w", "\n%{http_code}",
                "-H", f"Authorization: Bearer {key or self.admin_key}", self.url + path]
        if data is not None:
            args += ["--data-binary", "@-", "-H", f"Content-Type: {content_type}"]
        if accept:
            args += ["-H", f"Accept: {accept}"]
        result = subprocess.run(args, input=data, capture_output=True, timeout=30)
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code), json.loads(body) if body.strip() else {}

    def kubectl(self, *args: str, key: str | None = None, check: bool = True, input: str | None = None,
                binary: str = KUBECTL) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [binary, "--server", self.url + "/kubernetes/management", "--certificate-authority", self.ca,
             "--token", key or self.admin_key, "--cache-dir", str(self.folder / "kube-cache"),
             "--request-timeout=15s", *args],
            capture_output=True, text=True, input=input, timeout=60, env={**os.environ, "HOME": str(self.folder)})
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("management")
    cluster = start_devcluster(folder / "cluster", rules=VIEWER_RULES)
    gateway = None
    try:
        listen = f"127.0.0.1:{free_port()}"
        config = prepare(folder, cluster.url, cluster.ca_file, cluster.gateway_token_file, listen)
        cli(config, "user", "create", "admin", "--display-name", "Administrator", "--group", "loft:admins")
        cli(config, "user", "create", "jane", "--email", "jane@example.com", "--display-name", "Jane Doe")
        cli(config, "team", "create", "developers", "--member", "jane")
        scope = folder / "scope.json"
        scope.write_text(json.dumps(SCOPE))
        jane_key = new_key(config, "jane", "--name", "jane-laptop")
        scoped_key = new_key(config, "jane", "--name", "jane-ci", "--scope", str(scope))
        gateway = start_gateway(config.read_text(), folder)
        ca = str(folder / "gateway-tls" / "ca.crt")
        yield Stack(folder, config, f"https://{listen}", ca, (folder / "admin.key").read_text().strip(),
                    jane_key, scoped_key)
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.stop()


def jwt_part(token: str, index: int) -> dict:
    part = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# --- the seeds' curl examples --------------------------------------------------------------

def test_seed_curl_lists_users(stack):
    code, users = stack.curl("GET", f"{GROUP_PATH}/users")
    assert code == 200
    assert users["kind"] == "UserList" and users["apiVersion"] == "management.loft.sh/v1"
    assert "resourceVersion" in users["metadata"]
    by_name = {item["metadata"]["name"]: item for item in users["items"]}
    assert {"admin", "jane"} <= set(by_name)
    jane = by_name["jane"]
    assert jane["kind"] == "User" and jane["apiVersion"] == "management.loft.sh/v1"
    assert jane["spec"]["email"] == "jane@example.com" and jane["spec"]["displayName"] == "Jane Doe"
    assert jane["status"]["teams"] == ["developers"]
    assert jane["metadata"]["uid"] and jane["metadata"]["creationTimestamp"].endswith("Z")


def test_seed_curl_creates_a_self_from_yaml(stack):
    code, self_ = stack.curl("POST", f"{GROUP_PATH}/selves", data=SELF_YAML.encode(), content_type="application/yaml")
    assert code == 201, self_
    status = self_["status"]
    assert self_["kind"] == "Self" and status["subject"] == "admin" and status["accessKey"] == "admin"
    assert "loft:admins" in status["groups"] and status["instanceID"]
    # The client's status was ignored: the gateway says who the key is.
    code, jane = stack.curl("POST", f"{GROUP_PATH}/selves", key=stack.jane_key, data=SELF_YAML.encode(),
                            content_type="application/yaml")
    assert code == 201, jane
    status = jane["status"]
    assert status["subject"] == "jane" and status["accessKey"] == "jane-laptop" and status["accessKeyType"] == "User"
    assert status["user"] == {"name": "jane", "username": "jane", "displayName": "Jane Doe",
                              "email": "jane@example.com", "subject": "jane"}
    assert status["teams"] == [{"name": "developers", "displayName": ""}]
    assert "accessKeyScope" not in status
    assert "loft:team:developers" in status["groups"] and "loft:admins" not in status["groups"]
    assert status["uid"] and stack.jane_key not in json.dumps(jane)
    code, scoped = stack.curl("POST", f"{GROUP_PATH}/selves", key=stack.scoped_key, data=SELF)
    assert code == 201 and scoped["status"]["accessKey"] == "jane-ci" and scoped["status"]["accessKeyScope"] == SCOPE


def test_seed_curl_creates_a_direct_cluster_endpoint_token(stack):
    code, token = stack.curl("POST", f"{GROUP_PATH}/directclusterendpointtokens", data=TOKEN_YAML.encode(),
                             content_type="application/yaml")
    assert code == 201, token
    jwt = token["status"]["token"]
    assert jwt != SEED_TOKEN  # the client's status is not echoed
    header, claims = jwt_part(jwt, 0), jwt_part(jwt, 1)
    assert header["alg"] == "RS256" and header["kid"]
    assert claims["aud"] == [CLUSTER] and claims["sub"] == "admin" and claims["exp"] - claims["iat"] == 3600


# --- kubectl ---------------------------------------------------------------------------------

def test_kubectl_api_resources(stack):
    out = stack.kubectl("api-resources", "--api-group", "management.loft.sh", "-o", "wide").stdout
    for resource, kind in (("users", "User"), ("teams", "Team"), ("selves", "Self"), ("ownedaccesskeys", "OwnedAccessKey"),
                           ("directclusterendpointtokens", "DirectClusterEndpointToken"), ("clusters", "Cluster")):
        line = next(line for line in out.splitlines() if line.split()[0] == resource)
        assert kind in line.split()
    assert next(line for line in out.splitlines() if line.startswith("selves")).split()[-1] == "create"


def test_kubectl_create_apply_patch_delete(stack):
    manifest = textwrap.dedent("""\
        apiVersion: management.loft.sh/v1
        kind: User
        metadata:
          name: bob
          labels: {team: platform}
        spec:
          displayName: Bob
          email: bob@example.com
          groups: [platform]
    """)
    stack.kubectl("create", "-f", "-", input=manifest)
    got = yaml.safe_load(stack.kubectl("get", "users", "bob", "-o", "yaml").stdout)
    assert got["spec"]["email"] == "bob@example.com" and got["metadata"]["labels"] == {"team": "platform"}
    assert "already exists" in stack.kubectl("create", "-f", "-", input=manifest, check=False).stderr
    applied = manifest.replace("name: bob\n", "name: carol\n")
    stack.kubectl("apply", "-f", "-", input=applied)
    stack.kubectl("apply", "-f", "-", input=applied.replace("displayName: Bob", "displayName: Carol"))
    carol = json.loads(stack.kubectl("get", "user", "carol", "-o", "json").stdout)
    assert carol["spec"]["displayName"] == "Carol"
    assert "kubectl.kubernetes.io/last-applied-configuration" in carol["metadata"]["annotations"]
    stack.kubectl("patch", "user", "carol", "--type", "merge", "-p", '{"spec": {"email": "carol@example.com"}}')
    stack.kubectl("patch", "user", "carol", "--type", "json", "-p", '[{"op": "add", "path": "/spec/groups/-", "value": "ops"}]')
    carol = json.loads(stack.kubectl("get", "user", "carol", "-o", "json").stdout)
    assert carol["spec"]["email"] == "carol@example.com" and carol["spec"]["groups"] == ["platform", "ops"]
    assert stack.kubectl("get", "users", "-l", "team=platform", "-o", "name").stdout.split() == ["user.management.loft.sh/bob",
                                                                                           "user.management.loft.sh/carol"]
    stack.kubectl("delete", "user", "bob", "carol")
    missing = stack.kubectl("get", "user", "bob", check=False)
    assert missing.returncode != 0 and 'users.management.loft.sh "bob" not found' in missing.stderr


def test_kubectl_get_shows_table_columns(stack):
    out = stack.kubectl("get", "users").stdout.splitlines()
    assert out[0].split()[:2] == ["NAME", "USERNAME"] and any(line.startswith("jane ") for line in out)


def test_kubectl_watch_sees_a_user_the_cli_creates(stack):
    watch = subprocess.Popen(
        [KUBECTL, "--server", stack.url + "/kubernetes/management", "--certificate-authority", stack.ca,
         "--token", stack.admin_key, "--cache-dir", str(stack.folder / "kube-cache"), "get", "users", "-w"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HOME": str(stack.folder)})
    try:
        # The watch asks for Table rows, as `kubectl get -w` does: one row per event, columns as for get.
        assert read_line(watch, 15).split()[:2] == ["NAME", "USERNAME"]
        while read_line(watch, 15).split()[0] != "jane":
            pass
        cli(stack.config, "user", "create", "watched", "--email", "watched@example.com")
        while (row := read_line(watch, 10).split())[0] != "watched":
            pass
        assert "watched@example.com" in row
    finally:
        watch.kill()
        watch.wait()


def test_kubectl_explain(stack):
    spec = stack.kubectl("explain", "user.spec").stdout
    assert "email" in spec and "displayName" in spec and "The user's email address." in spec
    for binary in (KUBECTL, "/usr/lib/google-cloud-sdk/bin/kubectl.1.27"):
        scope = stack.kubectl("explain", "ownedaccesskeys.spec.scope", binary=binary).stdout
        assert "KIND:" in scope and "OwnedAccessKey" in scope and "clusters" in scope


def test_server_side_dry_runs_change_nothing(stack):
    manifest = textwrap.dedent("""\
        apiVersion: management.loft.sh/v1
        kind: User
        metadata:
          name: dry
        spec:
          email: dry@example.com
    """)
    created = yaml.safe_load(stack.kubectl("create", "--dry-run=server", "-o", "yaml", "-f", "-", input=manifest).stdout)
    assert created["spec"]["email"] == "dry@example.com"
    assert stack.curl("GET", f"{GROUP_PATH}/users/dry")[0] == 404
    before = stack.curl("GET", f"{GROUP_PATH}/users/jane")[1]
    patched = stack.kubectl("patch", "user", "jane", "--dry-run=server", "--type", "merge", "-o", "json",
                            "-p", '{"spec": {"email": "changed@example.com"}}')
    assert json.loads(patched.stdout)["spec"]["email"] == "changed@example.com"
    stack.kubectl("delete", "user", "jane", "--dry-run=server")
    assert stack.curl("GET", f"{GROUP_PATH}/users/jane")[1] == before
    bad = stack.curl("POST", f"{GROUP_PATH}/users?dryRun=All", data=json.dumps(
        {"apiVersion": "management.loft.sh/v1", "kind": "User", "metadata": {"name": "dry", "labels": {"a": "-bad-"}}}).encode())
    assert bad[0] == 422, bad


def test_kubectl_auth_whoami_against_the_management_api(stack):
    who = json.loads(stack.kubectl("auth", "whoami", "-o", "json", key=stack.jane_key).stdout)
    assert who["status"]["userInfo"]["username"] == "jane"


def test_clusters_show_the_health_the_gateway_measured(stack):
    deadline = time.monotonic() + 10
    while (cluster := json.loads(stack.kubectl("get", "cluster", CLUSTER, "-o", "json").stdout))["status"]["phase"] != "Ready":
        assert time.monotonic() < deadline, cluster
        time.sleep(0.2)
    status = cluster["status"]
    assert status["kubernetesVersion"].startswith("v1.") and 0 < status["latencySeconds"] < 5
    assert status["lastProbeTime"].endswith("Z") and cluster["spec"]["server"].startswith("https://127.0.0.1:")
    assert stack.kubectl("get", "clusters").stdout.split()[:5] == ["NAME", "PHASE", "VERSION", "LATENCY", "AGE"]


def test_lists_page_with_limit_and_continue(stack):
    for name in ("page-a", "page-b", "page-c"):
        cli(stack.config, "user", "create", name, "--group", "paged")
    time.sleep(0.6)  # the CLI's writes reach the worker's snapshot within a poll
    names, token = [], ""
    while True:
        code, page = stack.curl("GET", f"{GROUP_PATH}/users?limit=2&labelSelector=&continue={token}")
        assert code == 200 and len(page["items"]) <= 2
        names += [item["metadata"]["name"] for item in page["items"]]
        token = page["metadata"].get("continue", "")
        if not token:
            break
        assert page["metadata"]["remainingItemCount"] > 0
    assert names == sorted(names) and {"page-a", "page-b", "page-c", "jane", "admin"} <= set(names)
    assert stack.curl("GET", f"{GROUP_PATH}/users?continue=not-a-token")[0] == 400


def test_update_with_a_stale_resource_version_is_a_conflict(stack):
    code, user = stack.curl("GET", f"{GROUP_PATH}/users/jane")
    assert code == 200
    stale = dict(user, spec={**user["spec"], "description": "first"})
    code, _ = stack.curl("PUT", f"{GROUP_PATH}/users/jane", data=json.dumps(stale).encode())
    assert code == 200
    code, status = stack.curl("PUT", f"{GROUP_PATH}/users/jane", data=json.dumps(stale).encode())
    assert code == 409 and status["reason"] == "Conflict"


def test_watch_from_a_version_older_than_the_workers_history_is_gone(stack):
    result = subprocess.run(["curl", "-s", "--cacert", stack.ca, "-H", f"Authorization: Bearer {stack.admin_key}",
                             f"{stack.url}{GROUP_PATH}/users?watch=1&resourceVersion=1"],
                            capture_output=True, timeout=20)
    event = json.loads(result.stdout.splitlines()[0])
    assert event["type"] == "ERROR" and event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"


# --- the official Python client --------------------------------------------------------------

def test_python_client_lists_and_watches_users(stack):
    from kubernetes import client, watch

    configuration = client.Configuration()
    configuration.host = stack.url + "/kubernetes/management"
    configuration.ssl_ca_cert = stack.ca
    configuration.api_key = {"authorization": "Bearer " + stack.admin_key}
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    users = api.list_cluster_custom_object("management.loft.sh", "v1", "users")
    assert "jane" in [item["metadata"]["name"] for item in users["items"]]
    stream = watch.Watch().stream(api.list_cluster_custom_object, "management.loft.sh", "v1", "users",
                                  resource_version=users["metadata"]["resourceVersion"], timeout_seconds=10)
    cli(stack.config, "user", "create", "from-python-watch")
    for event in stream:
        if event["object"]["metadata"]["name"] == "from-python-watch":
            assert event["type"] == "ADDED"
            break
    else:
        pytest.fail("the watch ended without the new user")


# --- authorization -----------------------------------------------------------------------------

def test_a_user_may_see_itself_and_its_own_keys_only(stack):
    jane = stack.jane_key
    assert stack.curl("GET", f"{GROUP_PATH}/users/jane", key=jane)[0] == 200
    code, refusal = stack.curl("GET", f"{GROUP_PATH}/users", key=jane)
    assert code == 403 and refusal["reason"] == "Forbidden"
    assert refusal["message"] == ('users.management.loft.sh is forbidden: User "jane" cannot list resource "users" '
                                  'in API group "management.loft.sh" at the cluster scope')
    assert stack.curl("GET", f"{GROUP_PATH}/users/admin", key=jane)[0] == 403
    assert stack.curl("GET", f"{GROUP_PATH}/teams", key=jane)[0] == 403
    assert stack.curl("POST", f"{GROUP_PATH}/users", key=jane,
                      data=b'{"apiVersion":"management.loft.sh/v1","kind":"User","metadata":{"name":"eve"}}')[0] == 403
    code, created = stack.curl("POST", f"{GROUP_PATH}/ownedaccesskeys", key=jane, data=json.dumps({
        "apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "jane-build"},
        "spec": {"displayName": "Build", "scope": {"clusters": [{"cluster": CLUSTER}]}}}).encode())
    assert code == 201, created
    secret = created["spec"]["key"]
    # What a key was created as stays: no moving it to another user, no longer lifetime.
    moved = dict(created, spec={**created["spec"], "user": "admin"})
    del moved["spec"]["key"]
    code, refusal = stack.curl("PUT", f"{GROUP_PATH}/ownedaccesskeys/jane-build", key=jane, data=json.dumps(moved).encode())
    assert code == 422 and "spec.user" in refusal["message"], refusal
    renamed = dict(moved, spec={**moved["spec"], "user": "jane", "displayName": "Build 2"})
    code, updated = stack.curl("PUT", f"{GROUP_PATH}/ownedaccesskeys/jane-build", key=jane, data=json.dumps(renamed).encode())
    assert code == 200 and updated["spec"]["displayName"] == "Build 2" and "key" not in updated["spec"]
    code, keys = stack.curl("GET", f"{GROUP_PATH}/ownedaccesskeys", key=jane)
    names = sorted(item["metadata"]["name"] for item in keys["items"])
    assert code == 200 and {"jane-build", "jane-ci", "jane-laptop"} <= set(names)
    assert secret not in json.dumps(keys) and all("key" not in item["spec"] for item in keys["items"])
    assert stack.curl("GET", f"{GROUP_PATH}/ownedaccesskeys", key=stack.admin_key)[1]["items"] == []
    # The new key works, then stops working once deleted.
    # Its scope reaches one cluster only: the management API refuses it, the cluster does not.
    assert stack.curl("POST", f"{GROUP_PATH}/selves", key=secret, data=SELF)[0] == 403
    code, review = stack.curl("POST", WHOAMI, key=secret, data=REVIEW)
    assert code == 201 and review["status"]["userInfo"]["username"] == "jane"
    assert stack.curl("DELETE", f"{GROUP_PATH}/ownedaccesskeys/jane-build", key=jane)[0] == 200
    assert stack.curl("POST", WHOAMI, key=secret, data=REVIEW)[0] == 401


def test_a_scoped_key_cannot_mint_a_wider_key_or_token(stack):
    jane = stack.scoped_key
    wider = {"clusters": [{"cluster": "*"}]}
    code, refusal = stack.curl("POST", f"{GROUP_PATH}/directclusterendpointtokens", key=jane,
                               data=token_request(scope=wider))
    assert code == 403 and "wider" in refusal["message"]
    code, _ = stack.curl("POST", f"{GROUP_PATH}/ownedaccesskeys", key=jane, data=json.dumps({
        "apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "jane-wide"},
        "spec": {"scope": wider}}).encode())
    assert code == 403
    code, unscoped = stack.curl("POST", f"{GROUP_PATH}/ownedaccesskeys", key=jane, data=json.dumps({
        "apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "jane-inherits"},
        "spec": {}}).encode())
    assert code == 201 and unscoped["spec"]["scope"] == SCOPE
    assert stack.curl("GET", f"{GROUP_PATH}/users/jane", key=jane)[0] == 403  # outside the key's scope
    assert stack.curl("POST", f"{GROUP_PATH}/directclusterendpointtokens", key=jane, data=token_request(ttl=-5))[0] == 422
    assert stack.curl("POST", f"{GROUP_PATH}/directclusterendpointtokens", key=jane, data=token_request(ttl=10 ** 9))[0] == 422


# --- hostile bodies ----------------------------------------------------------------------------

USER = {"apiVersion": "management.loft.sh/v1", "kind": "User", "metadata": {"name": "mallory"}, "spec": {}}


@pytest.mark.parametrize(("body", "content_type", "code", "says"), [
    (b"a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b]\n",
     "application/yaml", 400, "aliases"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "JSON"),
    (json.dumps({**USER, "kind": "Team"}).encode(), "application/json", 422, "kind"),
    (json.dumps({**USER, "apiVersion": "v1"}).encode(), "application/json", 422, "apiVersion"),
    (json.dumps({**USER, "spec": {"emial": "x"}}).encode(), "application/json", 400, "unknown field"),
    (json.dumps({**USER, "spec": {"groups": "admins"}}).encode(), "application/json", 422, "spec.groups"),
    (json.dumps({**USER, "metadata": {"name": "Not_A_Name"}}).encode(), "application/json", 422, "name"),
    (b"<user/>", "application/xml", 415, "unknown format"),
])
def test_hostile_bodies_are_refused_and_change_nothing(stack, body, content_type, code, says):
    got, status = stack.curl("POST", f"{GROUP_PATH}/users", data=body, content_type=content_type)
    assert got == code and status["kind"] == "Status" and status["code"] == code, status
    assert says in status["message"]
    assert stack.curl("GET", f"{GROUP_PATH}/users/mallory")[0] == 404


def test_a_ten_megabyte_body_is_refused(stack):
    body = json.dumps({**USER, "spec": {"description": "x" * 10_000_000}}).encode()
    got, status = stack.curl("POST", f"{GROUP_PATH}/users", data=body)
    assert got == 413 and status["reason"] == "RequestEntityTooLarge"
    assert stack.curl("GET", f"{GROUP_PATH}/users/mallory")[0] == 404


def test_a_secret_sent_in_a_key_is_never_echoed(stack):
    secret = "fpk-this-is-a-real-secret-somewhere-else"
    got, status = stack.curl("POST", f"{GROUP_PATH}/ownedaccesskeys", key=stack.jane_key, data=json.dumps({
        "apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "jane-mine"},
        "spec": {"key": secret}}).encode())
    assert got == 422 and secret not in json.dumps(status)
    assert stack.curl("GET", f"{GROUP_PATH}/ownedaccesskeys/jane-mine", key=stack.jane_key)[0] == 404


# --- Direct Cluster Endpoint tokens on an edge gateway ------------------------------------------

def test_direct_cluster_endpoint_token_on_an_edge_gateway(stack, tmp_path):
    import tomllib

    central = tomllib.loads(stack.config.read_text())
    cluster = central["clusters"][0]
    (tmp_path / "jwks.json").write_text(cli(stack.config, "token", "jwks"))
    edge = start_gateway(f"""
        [server]
        listen = "127.0.0.1:{free_port()}"
        tls_cert_file = "{central['server']['tls_cert_file']}"
        tls_key_file = "{central['server']['tls_key_file']}"

        [[clusters]]
        name = "{CLUSTER}"
        server = "{cluster['server']}"
        ca_file = "{cluster['ca_file']}"
        token_file = "{cluster['token_file']}"

        [[clusters]]
        name = "other"
        server = "{cluster['server']}"
        ca_file = "{cluster['ca_file']}"
        token_file = "{cluster['token_file']}"

        [tokens]
        issuer = "{central['tokens']['issuer']}"
        jwks_file = "{tmp_path / 'jwks.json'}"
        revocation_file = "{tmp_path / 'revoked'}"
    """, tmp_path)
    try:
        def token(ttl: int) -> str:
            code, created = stack.curl("POST", f"{GROUP_PATH}/directclusterendpointtokens", key=stack.scoped_key,
                                       data=token_request(ttl=ttl))
            assert code == 201, created
            return created["status"]["token"]

        def kubectl(jwt: str, cluster_name: str = CLUSTER) -> subprocess.CompletedProcess:
            return subprocess.run(
                [KUBECTL, "--server", f"https://127.0.0.1:{edge.port}/kubernetes/cluster/{cluster_name}",
                 "--certificate-authority", stack.ca, "--token", jwt, "auth", "whoami", "-o", "json"],
                capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})

        lasting = token(600)
        assert jwt_part(lasting, 1)["aud"] == [CLUSTER]  # jane's key is scoped to that one cluster
        # The central gateway knows the token too: a Self says whose it is.
        code, self_ = stack.curl("POST", f"{GROUP_PATH}/selves", key=lasting, data=SELF)
        assert code == 201 and self_["status"]["subject"] == "jane"
        assert self_["status"]["accessKey"] == "token:" + jwt_part(lasting, 1)["jti"]
        who = kubectl(lasting)
        assert who.returncode == 0, who.stderr
        assert json.loads(who.stdout)["status"]["userInfo"]["username"] == "jane"
        elsewhere = kubectl(lasting, "other")
        assert elsewhere.returncode != 0 and "Unauthorized" in elsewhere.stderr

        brief = token(2)
        assert kubectl(brief).returncode == 0
        time.sleep(3)
        assert kubectl(brief).returncode != 0

        cli(tmp_path / "fastproxy.toml", "token", "revoke", jwt_part(lasting, 1)["jti"])
        deadline = time.monotonic() + 5
        while kubectl(lasting).returncode == 0:
            assert time.monotonic() < deadline, "the revoked token is still accepted"
            time.sleep(0.3)
    finally:
        edge.stop()


def test_every_worker_serves_what_another_one_wrote(stack, tmp_path):
    """Two workers share the port and the state store: a user created through one is listed by both."""
    import tomllib

    central = tomllib.loads(stack.config.read_text())
    port = free_port()
    text = stack.config.read_text().replace(f'listen = "{central["server"]["listen"]}"',
                                            f'listen = "127.0.0.1:{port}"\nworkers = 2')
    text = text.replace('path = "state.db"', f'path = "{stack.folder / "state.db"}"')
    text = text.replace('signing_keys_dir = "signing-keys"', f'signing_keys_dir = "{stack.folder / "signing-keys"}"')
    text = text.replace('key_file = "admin.key"', f'key_file = "{stack.folder / "admin.key"}"')
    text = text.replace('key_file = "viewer.key"', f'key_file = "{stack.folder / "viewer.key"}"')
    workers = start_gateway(text, tmp_path)
    try:
        url = f"https://127.0.0.1:{port}{GROUP_PATH}/users"
        user = {"apiVersion": "management.loft.sh/v1", "kind": "User", "metadata": {"name": "shared"}, "spec": {}}
        created = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", stack.ca, "-X", "POST",
                                  "-H", f"Authorization: Bearer {stack.admin_key}", "-H", "Content-Type: application/json",
                                  "--data-binary", json.dumps(user), url], capture_output=True, text=True, timeout=20)
        assert created.stdout == "201"
        time.sleep(0.6)  # the other worker's next poll
        # A new connection each time: SO_REUSEPORT spreads them over both workers (all 20 on one: p < 1e-5).
        for _ in range(20):
            got = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", stack.ca,
                                  "-H", f"Authorization: Bearer {stack.admin_key}", url + "/shared"],
                                 capture_output=True, text=True, timeout=20)
            assert got.stdout == "200"
    finally:
        workers.stop()


def test_requests_to_a_namespace_are_sleep_mode_activity(stack):
    code, _ = stack.curl("GET", f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces/team-b/configmaps")
    assert code == 200
    deadline = time.monotonic() + 10  # batched: written within FLUSH_INTERVAL, then seen within a poll
    while (got := stack.curl("GET", f"{GROUP_PATH}/namespaceactivities/{CLUSTER}.team-b"))[0] != 200:
        assert time.monotonic() < deadline, got
        time.sleep(0.3)
    status = got[1]["status"]
    assert status["lastActivityInfo"] == {"subject": "admin", "verb": "list", "resource": "configmaps"}
    assert abs(status["lastActivity"] - time.time()) < 15
    assert stack.curl("GET", f"{GROUP_PATH}/namespaceactivities", key=stack.jane_key)[0] == 403  # admins only
    rows = [line.split() for line in cli(stack.config, "activity", "list").splitlines()]
    assert [CLUSTER, "team-b"] in [row[:2] for row in rows]
    table = stack.kubectl("get", "namespaceactivities").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "CLUSTER", "NAMESPACE"] and any(f"{CLUSTER}.team-b" in row for row in table)


def test_bad_watch_parameters_are_refused_before_the_stream_opens(stack):
    for query in ("resourceVersion=abc", "timeoutSeconds=-1"):
        code, status = stack.curl("GET", f"{GROUP_PATH}/users?watch=1&{query}")
        assert code == 400 and status["reason"] == "BadRequest" and query.split("=")[0] in status["message"]
