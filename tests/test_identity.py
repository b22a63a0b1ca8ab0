"""Identity and access on the request path, through a real gateway process over TLS.

Access keys from the configuration and from the state file, Direct Cluster Endpoint tokens
(and every hostile shape of one), access key scopes, nested impersonation checked by
SubjectAccessReview, the WebSocket bearer subprotocol, and key changes made by the CLI in
another process reaching every worker.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from fastproxy.auth.tokens import KeySet, issue_token
from fastproxy.store.sqlite import SqliteStore
from tests.helpers import ACCESS_KEY, Process, start_gateway
from tests.rawhttp import Client

AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}
ISSUER = "https://central.fastproxy.test"

# One key per scope: (scope, a request it allows or None, the neighbouring request it refuses).
# A request is (method, path, cluster); the refusal message must name what the scope lacks.
SCOPE_CASES = {
    "clusters": ({"clusters": [{"cluster": "one"}]},
                 ("DELETE", "/api/v1/namespaces/dev/pods/web", "one"),
                 ("GET", "/api/v1/namespaces/dev/pods/web", "two"),
                 "access key scope does not allow get pods 'web' in namespace 'dev' on cluster 'two'"),
    "verbs": ({"rules": [{"verbs": ["get", "list"]}]},
              ("GET", "/api/v1/namespaces/dev/pods/web", "one"),
              ("DELETE", "/api/v1/namespaces/dev/pods/web", "one"),
              "access key scope does not allow delete pods 'web' in namespace 'dev' on cluster 'one'"),
    "resources": ({"rules": [{"resources": [{"group": "", "resources": ["pods"]}]}]},
                  ("GET", "/api/v1/namespaces/dev/pods", "one"),
                  ("GET", "/api/v1/namespaces/dev/secrets", "one"),
                  "access key scope does not allow list secrets in namespace 'dev' on cluster 'one'"),
    "group": ({"rules": [{"resources": [{"group": "apps", "resources": ["deployments"]}]}]},
              ("GET", "/apis/apps/v1/namespaces/dev/deployments", "one"),
              ("GET", "/apis/extensions/v1beta1/namespaces/dev/deployments", "one"),
              "access key scope does not allow list deployments.extensions in namespace 'dev' on cluster 'one'"),
    "resource-names": ({"rules": [{"resources": [{"group": "", "resources": ["pods"], "resourceNames": ["web"]}]}]},
                       ("GET", "/api/v1/namespaces/dev/pods/web", "one"),
                       ("GET", "/api/v1/namespaces/dev/pods/db", "one"),
                       "access key scope does not allow get pods 'db' in namespace 'dev' on cluster 'one'"),
    "namespaces": ({"rules": [{"namespaces": ["dev"]}]},
                   ("GET", "/api/v1/namespaces/dev/pods", "one"),
                   ("GET", "/api/v1/namespaces/prod/pods", "one"),
                   "access key scope does not allow list pods in namespace 'prod' on cluster 'one'"),
    "cluster-scoped": ({"rules": [{"namespaces": [""]}]},
                       ("GET", "/api/v1/nodes", "one"),
                       ("GET", "/api/v1/namespaces/dev/pods", "one"),
                       "access key scope does not allow list pods in namespace 'dev' on cluster 'one'"),
    "non-resource-urls": ({"rules": [{"nonResourceURLs": ["/version", "/healthz/*"]}]},
                          ("GET", "/healthz/etcd", "one"),
                          ("GET", "/metrics", "one"),
                          "access key scope does not allow get /metrics on cluster 'one'"),
    "rule-cluster": ({"rules": [{"cluster": "one", "verbs": ["get"]}]},
                     ("GET", "/api/v1/namespaces/dev/pods/web", "one"),
                     ("GET", "/api/v1/namespaces/dev/pods/web", "two"),
                     "access key scope does not allow get pods 'web' in namespace 'dev' on cluster 'two'"),
    "request-targets": ({"rules": [{"requestTargets": ["Management"]},
                                   {"requestTargets": ["Cluster"], "namespaces": ["dev"]}]},
                        ("GET", "/api/v1/namespaces/dev/pods", "one"),
                        ("GET", "/api/v1/namespaces/prod/pods", "one"),
                        "access key scope does not allow list pods in namespace 'prod' on cluster 'one'"),
    "projects": ({"projects": [{"project": "*"}]}, None,
                 ("GET", "/api/v1/namespaces/dev/pods", "one"),
                 "access key scope does not allow list pods in namespace 'dev' on cluster 'one'"),
    "loft-cli-role": ({"roles": [{"role": "loft-cli"}]}, None,
                      ("GET", "/version", "one"),
                      "access key scope does not allow get /version on cluster 'one'"),
    "exec": ({"rules": [{"verbs": ["create"], "resources": [{"group": "", "resources": ["pods/exec"]}]}]},
             None,
             ("GET", "/api/v1/namespaces/dev/pods/web/log", "one"),
             "access key scope does not allow get pods/log 'web' in namespace 'dev' on cluster 'one'"),
}

CONFIG = """
    [server]
    listen = "127.0.0.1:0"
    tls_cert_file = "{cert}"
    tls_key_file = "{key}"
    workers = {workers}

    [[clusters]]
    name = "one"
    server = "https://127.0.0.1:{port}"
    ca_file = "{ca}"
    token_file = "token"
    response_header_timeout = 3

    [[clusters]]
    name = "two"
    server = "https://127.0.0.1:{port}"
    ca_file = "{ca}"
    token_file = "token"

    [[access_keys]]
    name = "alice-static"
    key_file = "key"
    user = "alice"
    groups = ["dev", "ops"]
"""
CENTRAL = """
    [state]
    path = "state.db"

    [tokens]
    issuer = "{issuer}"
    signing_keys_dir = "keys"
    revocation_file = "revoked.txt"
"""


@dataclass
class World:
    folder: Path
    gateway: Process
    keys: dict[str, str]
    ca: Path

    @property
    def config(self) -> str:
        return str(self.folder / "fastproxy.toml")


def write_common_files(folder: Path) -> None:
    (folder / "token").write_text("gateway-credential-for-upstream\n")
    (folder / "key").write_text(ACCESS_KEY + "\n")


def config_text(tls_files, upstream, workers=1, extra=CENTRAL) -> str:
    return CONFIG.format(cert=tls_files["cert"], key=tls_files["key"], ca=tls_files["ca"], port=upstream.port,
                         workers=workers) + extra.format(issuer=ISSUER)


@pytest.fixture(scope="module")
def world(tls_files, upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("identity")
    write_common_files(folder)
    store = SqliteStore(folder / "state.db")
    store.create_user("alice", groups=["dev"])
    store.create_user("carol")
    keys = {}
    _, keys["store"] = store.create_access_key(user="alice", name="alice-store")
    _, keys["disabled"] = store.create_access_key(user="alice", name="disabled")
    store.disable_access_key("disabled")
    _, keys["expired"] = store.create_access_key(user="alice", name="expired", ttl=60, now=time.time() - 3600)
    _, keys["revoked"] = store.create_access_key(user="alice", name="revoked")
    store.revoke_access_key("revoked")
    _, keys["disabled-user"] = store.create_access_key(user="carol", name="carols")
    store.disable_user("carol")
    for name, (scope, *_) in SCOPE_CASES.items():
        _, keys[name] = store.create_access_key(user="alice", name=f"scope-{name}", scope=scope)
    store.close()
    gateway = start_gateway(config_text(tls_files, upstream), folder)
    yield World(folder, gateway, keys, tls_files["ca"])
    gateway.stop()


@pytest.fixture
def client(world):
    c = Client(world.gateway.port, world.ca)
    yield c
    c.close()


def call(client, method, path, headers=None, cluster="one"):
    client.request(method, f"/kubernetes/cluster/{cluster}{path}", headers)
    return client.response()


def seen(response) -> dict:
    assert response.status == 200, response.body
    return response.json()


def header_values(echo: dict, name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


def refused(response, code: int, message: str) -> None:
    assert response.status == code, response.body
    body = response.json()
    assert body["kind"] == "Status" and body["code"] == code and body["message"] == message, body


def upstream_hits(client, segment: str) -> int:
    return call(client, "GET", "/stats", AUTH).json()["hits"].get(segment, 0)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- access keys from the state file ----

def test_a_store_key_runs_as_its_user(world, client):
    echo = seen(call(client, "GET", "/api/v1/namespaces/dev/pods", bearer(world.keys["store"])))
    assert header_values(echo, "Impersonate-User") == ["alice"]
    assert header_values(echo, "Impersonate-Group") == [
        "dev", "system:authenticated", "loft:authenticated", "loft:user:alice"]
    assert header_values(echo, "Authorization") == ["Bearer gateway-credential-for-upstream"]


@pytest.mark.parametrize("name", ["disabled", "expired", "revoked", "disabled-user"])
def test_unusable_store_keys_are_401(world, client, name):
    before = upstream_hits(client, "unusable")
    refused(call(client, "GET", "/api/v1/unusable", bearer(world.keys[name])), 401, "Unauthorized: invalid access key")
    assert upstream_hits(client, "unusable") == before


# ---- scopes ----

@pytest.mark.parametrize("name", SCOPE_CASES)
def test_each_scope_allows_what_it_should_and_refuses_its_neighbour(world, client, name):
    _, allowed, (method, path, cluster), message = SCOPE_CASES[name]
    key = bearer(world.keys[name])
    if allowed is not None:
        allowed_method, allowed_path, allowed_cluster = allowed
        echo = seen(call(client, allowed_method, allowed_path, key, allowed_cluster))
        assert (echo["method"], echo["target"]) == (allowed_method, allowed_path)
    segment = path.rsplit("/", 1)[1]
    before = upstream_hits(client, segment)
    refused(call(client, method, path, key, cluster), 403, message)
    assert upstream_hits(client, segment) == before  # nothing reached the cluster


def exec_upgrade(method: str, subresource: str, key: str, protocol: str | None = None) -> bytes:
    upgrade = "websocket" if method == "GET" else "SPDY/3.1"
    extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"{method} /kubernetes/cluster/one/api/v1/namespaces/dev/pods/web/{subresource}/upgrade?command=sh "
            f"HTTP/1.1\r\nHost: g\r\n{auth}Connection: Upgrade\r\nUpgrade: {upgrade}\r\n{extra}"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n").encode()


def switched(client) -> dict[str, str]:
    """Read a 101 head; returns the request headers the upstream reported it received."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = client.read_some()
        assert more, f"closed after {data!r}"
        data += more
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 101 "), head
    received = next(line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("X-Received: "))
    return dict(json.loads(received))


@pytest.mark.parametrize("method", ["GET", "POST"])  # WebSocket (kubectl >= 1.30) and SPDY
def test_exec_scope_allows_exec_both_ways_but_not_attach(world, client, method):
    client.send(exec_upgrade(method, "exec", world.keys["exec"]))
    assert switched(client)["Impersonate-User"] == "alice"
    other = Client(world.gateway.port, world.ca)
    other.send(exec_upgrade(method, "attach", world.keys["exec"]))
    verb = "get" if method == "GET" else "create"
    refused(other.response(), 403,
            f"access key scope does not allow {verb} pods/attach 'web' in namespace 'dev' on cluster 'one'")
    other.close()


# ---- the WebSocket bearer subprotocol ----

def subprotocol(token: str) -> str:
    return "base64url.bearer.authorization.k8s.io." + base64.urlsafe_b64encode(token.encode()).rstrip(b"=").decode()


def test_websocket_subprotocol_token_is_accepted_and_stripped(world, client):
    client.send(exec_upgrade("GET", "exec", "", f"{subprotocol(ACCESS_KEY)}, v5.channel.k8s.io, v4.channel.k8s.io"))
    received = switched(client)
    assert received["Sec-WebSocket-Protocol"] == "v5.channel.k8s.io, v4.channel.k8s.io"
    assert received["Impersonate-User"] == "alice"
    assert received["Authorization"] == "Bearer gateway-credential-for-upstream"
    assert ACCESS_KEY not in json.dumps(received) and "base64url" not in json.dumps(received)


def test_websocket_subprotocol_carries_a_token_too(world, client):
    token = issue(world, "one")
    client.send(exec_upgrade("GET", "exec", "", subprotocol(token)))
    received = switched(client)
    assert received["Impersonate-User"] == "alice" and "Sec-WebSocket-Protocol" not in received


def test_authorization_wins_over_the_subprotocol_which_is_still_stripped(world, client):
    client.send(exec_upgrade("GET", "exec", ACCESS_KEY, f"{subprotocol('not-a-key')}, v5.channel.k8s.io"))
    assert switched(client)["Sec-WebSocket-Protocol"] == "v5.channel.k8s.io"


@pytest.mark.parametrize("protocol,message", [
    ("base64url.bearer.authorization.k8s.io.not*base64", "Unauthorized: the bearer token subprotocol is not base64url"),
    (subprotocol("not-a-key"), "Unauthorized: invalid access key"),
])
def test_bad_subprotocol_tokens_are_401(world, client, protocol, message):
    client.send(exec_upgrade("GET", "exec", "", protocol))
    refused(client.response(), 401, message)


def test_the_subprotocol_is_no_credential_outside_a_websocket(world, client):
    response = call(client, "GET", "/api/v1/pods", {"Sec-WebSocket-Protocol": subprotocol(ACCESS_KEY)})
    refused(response, 401, "Unauthorized: a bearer access key is required")


# ---- Direct Cluster Endpoint tokens ----

def issue(world, audience, **overrides) -> str:
    arguments = dict(issuer=ISSUER, subject="alice", audience=audience, groups=["dev", "tokens"], ttl=600)
    arguments.update(overrides)
    return issue_token(KeySet(world.folder / "keys"), **arguments)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def payload(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_a_token_runs_as_its_subject_on_its_cluster(world, client):
    echo = seen(call(client, "GET", "/api/v1/namespaces/dev/pods", bearer(issue(world, "one"))))
    assert header_values(echo, "Impersonate-User") == ["alice"]
    assert header_values(echo, "Impersonate-Group") == ["dev", "tokens"]


def test_a_token_scope_is_enforced(world, client):
    token = issue(world, "one", scope={"rules": [{"verbs": ["get"]}]})
    seen(call(client, "GET", "/api/v1/namespaces/dev/pods/web", bearer(token)))
    refused(call(client, "DELETE", "/api/v1/namespaces/dev/pods/web", bearer(token)), 403,
            "access key scope does not allow delete pods 'web' in namespace 'dev' on cluster 'one'")


def forged(world, header: dict, claims: dict, sign) -> str:
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    return f"{signing_input}.{sign(signing_input.encode())}"


@pytest.fixture(scope="module")
def hostile_tokens(world) -> dict[str, tuple[str, str, str]]:
    """name -> (token, cluster, the 401 message)."""
    keyset = KeySet(world.folder / "keys")
    good = issue(world, "one")
    claims = payload(good)
    kid = keyset.active.kid
    public_pem = keyset.active.public_key.public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    header, body, signature = good.split(".")
    stranger = KeySet(world.folder / "stranger-keys")
    return {
        "alg-none": (forged(world, {"alg": "none", "kid": kid}, claims, lambda _: ""), "one",
                     "Unauthorized: token algorithm 'none' is not allowed"),
        "hs256-with-the-public-key": (
            forged(world, {"alg": "HS256", "kid": kid}, claims,
                   lambda data: b64(hmac.new(public_pem, data, hashlib.sha256).digest())), "one",
            "Unauthorized: token algorithm 'HS256' is not allowed"),
        "expired": (issue(world, "one", ttl=60, now=time.time() - 3600), "one", "Unauthorized: token has expired"),
        "wrong-audience": (good, "two", "Unauthorized: token is not valid for cluster 'two'"),
        "wrong-issuer": (issue(world, "one", issuer="https://evil.example"), "one",
                         "Unauthorized: token issuer 'https://evil.example' is not trusted"),
        "unknown-kid": (issue_token(stranger, issuer=ISSUER, subject="alice", audience="one", groups=[], ttl=600),
                        "one", f"Unauthorized: token key id {stranger.active.kid!r} is unknown"),
        "tampered-payload": (f"{header}.{b64(orjson.dumps({**claims, 'sub': 'admin'}))}.{signature}", "one",
                             "Unauthorized: token signature is invalid"),
    }


@pytest.mark.parametrize("name", ["alg-none", "hs256-with-the-public-key", "expired", "wrong-audience",
                                  "wrong-issuer", "unknown-kid", "tampered-payload"])
def test_hostile_tokens_are_401(client, hostile_tokens, name):
    token, cluster, message = hostile_tokens[name]
    before = upstream_hits(client, "hostile")
    refused(call(client, "GET", "/api/v1/hostile", bearer(token), cluster), 401, message)
    assert upstream_hits(client, "hostile") == before


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastproxy", *argv], capture_output=True, text=True, timeout=30)


def until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds}s"
        time.sleep(0.05)


def test_a_revoked_token_is_refused_even_when_cached(world, client):
    token = issue(world, "one")
    seen(call(client, "GET", "/api/v1/pods", bearer(token)))  # verified and cached
    jti = payload(token)["jti"]
    revoke = run_cli("token", "revoke", jti, "--config", world.config)
    assert revoke.returncode == 0, revoke.stderr
    assert revoke.stdout.splitlines() == [f"token {jti} revoked in {world.folder / 'state.db'}",
                                          f"token {jti} revoked in {world.folder / 'revoked.txt'}"]
    until(lambda: call(client, "GET", "/api/v1/pods", bearer(token)).status == 401, 2, "revocation")
    refused(call(client, "GET", "/api/v1/pods", bearer(token)), 401, "Unauthorized: token has been revoked")


def test_cli_issued_token_works_on_its_cluster_only(world, client):
    issued = run_cli("token", "issue", "--config", world.config, "--user", "alice", "--cluster", "two", "--ttl", "120")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    claims = payload(token)
    assert claims["aud"] == ["two"] and claims["exp"] - claims["iat"] == 120
    assert issued.stderr.startswith(f"jti: {claims['jti']}, expires ")
    echo = seen(call(client, "GET", "/api/v1/pods", bearer(token), "two"))
    assert header_values(echo, "Impersonate-Group") == [
        "dev", "system:authenticated", "loft:authenticated", "loft:user:alice"]
    refused(call(client, "GET", "/api/v1/pods", bearer(token), "one"), 401,
            "Unauthorized: token is not valid for cluster 'one'")


def test_an_edge_gateway_verifies_tokens_on_its_own(world, tls_files, upstream, tmp_path):
    """No state file, no signing key: only the published JWKS and a revocation file."""
    jwks = run_cli("token", "jwks", "--config", world.config)
    assert jwks.returncode == 0, jwks.stderr
    (tmp_path / "jwks.json").write_text(jwks.stdout)
    write_common_files(tmp_path)
    edge = start_gateway(config_text(tls_files, upstream, extra="""
        [tokens]
        issuer = "{issuer}"
        jwks_file = "jwks.json"
        revocation_file = "revoked.json"
    """), tmp_path)
    try:
        token = issue(world, "one")
        edge_client = Client(edge.port, world.ca)
        seen(call(edge_client, "GET", "/api/v1/pods", bearer(token)))
        refused(call(edge_client, "GET", "/api/v1/pods", bearer(world.keys["store"])), 401,
                "Unauthorized: invalid access key")  # central's state file is not the edge's
        (tmp_path / "revoked.json").write_text('["someone-else"]')
        revoke = run_cli("token", "revoke", payload(token)["jti"], "--config", str(tmp_path / "fastproxy.toml"))
        assert revoke.returncode == 0, revoke.stderr
        assert json.loads((tmp_path / "revoked.json").read_text()) == ["someone-else", payload(token)["jti"]]
        until(lambda: call(edge_client, "GET", "/api/v1/pods", bearer(token)).status != 200, 10, "revocation")
        refused(call(edge_client, "GET", "/api/v1/pods", bearer(token)), 401, "Unauthorized: token has been revoked")
        edge_client.close()
    finally:
        edge.stop()


# ---- nested impersonation (kubectl --as) ----

def reviews_of(client, name: str) -> list[dict]:
    reviews = call(client, "GET", "/reviews", AUTH).json()
    return [r for r in reviews if r["body"]["spec"]["resourceAttributes"].get("name") == name]


def test_an_allowed_user_is_forwarded_in_place_of_the_key(client):
    echo = seen(call(client, "GET", "/api/v1/namespaces/dev/pods", {**AUTH, "Impersonate-User": "allowed-bob"}))
    assert header_values(echo, "Impersonate-User") == ["allowed-bob"]
    assert header_values(echo, "Impersonate-Group") == []  # alice's groups are gone
    assert header_values(echo, "Authorization") == ["Bearer gateway-credential-for-upstream"]
    (review,) = reviews_of(client, "allowed-bob")[-1:]
    assert review["body"] == {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": "alice", "groups": ["dev", "ops", "system:authenticated"],
                 "resourceAttributes": {"verb": "impersonate", "group": "", "resource": "users",
                                        "name": "allowed-bob"}}}
    sent = [name.lower() for name, _ in review["headers"]]
    assert ["Authorization", "Bearer gateway-credential-for-upstream"] in review["headers"]
    assert not [name for name in sent if name.startswith("impersonate-")]


NESTED = {
    "groups": ([("Impersonate-User", "allowed-u1"), ("Impersonate-Group", "allowed-admins"),
                ("Impersonate-Group", "allowed-ops")],
               [("Impersonate-User", "allowed-u1"), ("Impersonate-Group", "allowed-admins"),
                ("Impersonate-Group", "allowed-ops")]),
    "uid": ([("Impersonate-User", "allowed-u2"), ("Impersonate-Uid", "allowed-uid-7")],
            [("Impersonate-User", "allowed-u2"), ("Impersonate-Uid", "allowed-uid-7")]),
    "extra": ([("Impersonate-User", "allowed-u3"), ("Impersonate-Extra-Scopes", "allowed-read"),
               ("Impersonate-Extra-Example.com%2fTeam", "allowed-blue")],
              [("Impersonate-User", "allowed-u3"), ("Impersonate-Extra-example.com%2Fteam", "allowed-blue"),
               ("Impersonate-Extra-scopes", "allowed-read")]),
    "service-account": ([("Impersonate-User", "system:serviceaccount:dev:allowed-sa")],
                        [("Impersonate-User", "system:serviceaccount:dev:allowed-sa")]),
}


@pytest.mark.parametrize("name", NESTED)
def test_allowed_nested_identities_are_forwarded_as_the_cluster_expects(client, name):
    asked, forwarded = NESTED[name]
    lines = "".join(f"{k}: {v}\r\n" for k, v in asked)
    client.send(f"GET /kubernetes/cluster/one/api/v1/pods HTTP/1.1\r\nHost: g\r\n"
                f"Authorization: Bearer {ACCESS_KEY}\r\n{lines}\r\n".encode())
    echo = seen(client.response())
    assert [(k, v) for k, v in echo["headers"] if k.lower().startswith("impersonate-")] == forwarded


@pytest.mark.parametrize("asked", [{"Impersonate-Group": "allowed-g"}, {"Impersonate-Uid": "allowed-uid"},
                                   {"Impersonate-Extra-scopes": "allowed-read"}])
def test_nested_parts_without_a_user_are_400(client, asked):
    refused(call(client, "GET", "/api/v1/pods", {**AUTH, **asked}), 400,
            "Impersonate-Group, Impersonate-Uid and Impersonate-Extra-* need Impersonate-User")


def test_what_each_review_asks(client):
    call(client, "GET", "/api/v1/pods", {**AUTH, "Impersonate-User": "system:serviceaccount:ns1:allowed-x1",
                                         "Impersonate-Uid": "allowed-x2", "Impersonate-Extra-Team%2FName": "allowed-x3"})
    attributes = [reviews_of(client, name)[-1]["body"]["spec"]["resourceAttributes"]
                  for name in ("allowed-x1", "allowed-x2", "allowed-x3")]
    assert attributes == [
        {"verb": "impersonate", "group": "", "resource": "serviceaccounts", "namespace": "ns1", "name": "allowed-x1"},
        {"verb": "impersonate", "group": "authentication.k8s.io", "resource": "uids", "name": "allowed-x2"},
        {"verb": "impersonate", "group": "authentication.k8s.io", "resource": "userextras",
         "subresource": "team/name", "name": "allowed-x3"},
    ]


@pytest.mark.parametrize("asked,message", [
    ({"Impersonate-User": "bob"}, "user 'alice' may not impersonate users 'bob' on cluster 'one': no RBAC rule allows it"),
    ({"Impersonate-User": "allowed-bob", "Impersonate-Group": "system:masters"},
     "user 'alice' may not impersonate groups 'system:masters' on cluster 'one': no RBAC rule allows it"),
    ({"Impersonate-User": "allowed-bob", "Impersonate-Uid": "uid-1"},
     "user 'alice' may not impersonate uids 'uid-1' on cluster 'one': no RBAC rule allows it"),
    ({"Impersonate-User": "allowed-bob", "Impersonate-Extra-x": "secret"},
     "user 'alice' may not impersonate userextras/x 'secret' on cluster 'one': no RBAC rule allows it"),
    ({"Impersonate-User": "sar-fails"},
     "impersonation cannot be checked on cluster 'one': the SubjectAccessReview was answered with HTTP 500: "
     "etcd is down"),
])
def test_refused_impersonation_is_403_and_never_reaches_the_cluster(client, asked, message):
    before = upstream_hits(client, "refused-nested")
    refused(call(client, "GET", "/api/v1/refused-nested", {**AUTH, **asked}), 403, message)
    assert upstream_hits(client, "refused-nested") == before


def test_a_scoped_key_impersonating_is_still_held_to_its_scope(world, client):
    refused(call(client, "DELETE", "/api/v1/namespaces/dev/pods/web",
                 {**bearer(world.keys["verbs"]), "Impersonate-User": "allowed-bob"}), 403,
            "access key scope does not allow delete pods 'web' in namespace 'dev' on cluster 'one'")


def test_connection_naming_impersonate_user_changes_nothing(client):
    # CVE-2021-31999's shape: the named header is hop-by-hop, so it is dropped, not acted on,
    # and the gateway's own impersonation of the key's user still goes upstream.
    echo = seen(call(client, "GET", "/api/v1/pods", {**AUTH, "Connection": "Impersonate-User, Impersonate-Group",
                                                    "Impersonate-User": "allowed-conn-trick"}))
    assert header_values(echo, "Impersonate-User") == ["alice"]
    assert header_values(echo, "Impersonate-Group") == ["dev", "ops"]
    assert reviews_of(client, "allowed-conn-trick") == []


def test_review_answers_are_cached_briefly(client):
    for _ in range(3):
        seen(call(client, "GET", "/api/v1/pods", {**AUTH, "Impersonate-User": "allowed-cached"}))
    assert len(reviews_of(client, "allowed-cached")) == 1


def test_pipelined_requests_keep_their_order_around_a_review(client):
    def request(n, extra=""):
        return (f"GET /kubernetes/cluster/one/echo?n={n} HTTP/1.1\r\nHost: g\r\n"
                f"Authorization: Bearer {ACCESS_KEY}\r\n{extra}\r\n").encode()
    client.send(request(0, "Impersonate-User: allowed-pipe\r\n") + request(1)
                + request(2, "Impersonate-User: denied-pipe\r\n") + request(3))
    answers = [client.response() for _ in range(4)]
    assert [r.status for r in answers] == [200, 200, 403, 200]
    assert [header_values(r.json(), "Impersonate-User") for r in answers if r.status == 200] == [
        ["allowed-pipe"], ["alice"], ["alice"]]


# ---- changes made by the CLI reach every worker ----

def fresh_status(port, ca, key) -> int:
    """One request on a new connection, so that requests spread over the workers."""
    c = Client(port, ca)
    try:
        return call(c, "GET", "/api/v1/pods", bearer(key)).status
    finally:
        c.close()


def listening_status(port, ca, key) -> int | None:
    """fresh_status once a worker listens: the supervisor reports the port before its workers open it."""
    try:
        return fresh_status(port, ca, key)
    except ConnectionRefusedError:
        return None


def test_key_changes_by_the_cli_reach_both_workers_within_a_second(tls_files, upstream, tmp_path):
    write_common_files(tmp_path)
    store = SqliteStore(tmp_path / "state.db")
    store.create_user("alice")
    _, key = store.create_access_key(user="alice", name="to-disable")
    store.close()
    gateway = start_gateway(config_text(tls_files, upstream, workers=2), tmp_path)
    config = str(tmp_path / "fastproxy.toml")
    try:
        until(lambda: listening_status(gateway.port, tls_files["ca"], key) == 200, 5, "workers start")
        assert [fresh_status(gateway.port, tls_files["ca"], key) for _ in range(12)] == [200] * 12

        disable = run_cli("accesskey", "disable", "to-disable", "--config", config)
        assert (disable.returncode, disable.stdout) == (0, "access key to-disable disabled\n"), disable.stderr
        changed = time.monotonic()
        time.sleep(max(0.0, changed + 1.0 - time.monotonic()))
        assert [fresh_status(gateway.port, tls_files["ca"], key) for _ in range(12)] == [401] * 12

        created = run_cli("accesskey", "create", "--user", "alice", "--name", "fresh", "--config", config)
        assert created.returncode == 0, created.stderr
        new_key = created.stdout.split("key: ")[1].strip()
        time.sleep(1.0)
        assert [fresh_status(gateway.port, tls_files["ca"], new_key) for _ in range(12)] == [200] * 12
    finally:
        gateway.stop()
    # Last activity is batched in memory and written when the workers stop, at the latest.
    store = SqliteStore(tmp_path / "state.db")
    activity = {key.name: key.last_activity for key in store.list_access_keys()}
    store.close()
    assert activity["fresh"] is not None and time.time() - activity["fresh"] < 30
