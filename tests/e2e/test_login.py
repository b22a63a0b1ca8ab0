"""The /auth/ endpoints through the real gateway process over TLS, in front of the simulated cluster:
password login, the Login key with kubectl, refusals that look alike, back-off, logout, token
exchange, passwords set by admins through the management API, and no password in any log.

Each test speaks from a loopback address of its own (127.0.0.0/8 is all local), so the per-address
back-off of one test never meets another's."""
from __future__ import annotations

import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from devcluster.process import start_devcluster
from fastproxy.demo import CLUSTER, VIEWER_RULES, prepare
from tests.e2e.test_kubectl_through_gateway import free_port
from tests.e2e.test_management_api import jwt_part
from tests.helpers import start_gateway

KUBECTL = "/usr/bin/kubectl"
USERS = "/kubernetes/management/apis/management.loft.sh/v1/users"
pytestmark = pytest.mark.e2e

PASSWORDS = {"alice": "alice-Correct-Horse-1", "carol": "carol-Disabled-Horse-2", "erin": "erin-Managed-Horse-3",
             "root": "root-Admin-Horse-7"}
FREE_FAILURES = 5


class Stack:
    def __init__(self, folder: Path, config: Path, port: int, ca: str, admin_key: str, gateway):
        self.folder, self.config, self.port, self.ca, self.admin_key = folder, config, port, ca, admin_key
        self.gateway = gateway
        self.context = ssl.create_default_context(cafile=ca)

    def request(self, method: str, path: str, body: object = None, *, source: str, key: str | None = None,
                content_type: str = "application/json") -> tuple[int, dict, dict]:
        """One HTTPS request from the loopback address `source`: (status, headers, decoded body)."""
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context,
                                                 source_address=(source, 0), timeout=30)
        headers = {"Content-Type": content_type} if body is not None else {}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw) if raw else {}
        finally:
            connection.close()

    def login(self, username: str, password: str, source: str) -> tuple[int, dict, dict]:
        return self.request("POST", "/auth/password/login", {"username": username, "password": password}, source=source)

    def kubectl(self, key: str, *args: str, check: bool = True, target: str = f"cluster/{CLUSTER}",
                input: str | None = None) -> subprocess.CompletedProcess:
        """kubectl against a cluster through the gateway, or the management API (`target="management"`)."""
        result = subprocess.run(
            [KUBECTL, "--server", f"https://127.0.0.1:{self.port}/kubernetes/{target}",
             "--certificate-authority", self.ca, "--token", key, "--cache-dir", str(self.folder / "kube-cache"),
             "--request-timeout=15s", *args],
            input=input, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(self.folder)})
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result


def cli(config: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "fastproxy", *args, "--config", str(config)],
                            input=stdin, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("login")
    cluster = start_devcluster(folder / "cluster", rules=VIEWER_RULES)
    gateway = None
    try:
        listen = f"127.0.0.1:{free_port()}"
        config = prepare(folder, cluster.url, cluster.ca_file, cluster.gateway_token_file, listen)
        (folder / "audit-policy.yaml").write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: RequestResponse\n")
        demo = config.read_text()  # the demo's audit log, at RequestResponse
        assert '[audit]\npath = "audit.log"\n' in demo
        config.write_text(demo.replace('[audit]\npath = "audit.log"\n',
                                       '[audit]\npath = "audit.log"\npolicy_file = "audit-policy.yaml"\n') + f"""
[login]
key_ttl = 3600
token_ttl = 300
free_failures = {FREE_FAILURES}
max_backoff = 4
""")
        for name, groups in (("alice", ["demo:viewers"]), ("bob", []), ("carol", []), ("root", ["loft:admins"])):
            cli(config, "user", "create", name, *(arg for group in groups for arg in ("--group", group)))
        cli(config, "user", "set-password", "alice", stdin=PASSWORDS["alice"] + "\n")
        cli(config, "user", "set-password", "carol", stdin=PASSWORDS["carol"] + "\n")
        cli(config, "user", "set-password", "root", stdin=PASSWORDS["root"] + "\n")
        cli(config, "user", "disable", "carol")
        gateway = start_gateway(config.read_text(), folder)
        yield Stack(folder, config, int(listen.rsplit(":", 1)[1]), str(folder / "gateway-tls" / "ca.crt"),
                    (folder / "admin.key").read_text().strip(), gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.stop()


def test_a_password_login_answers_a_login_key_that_works_with_kubectl(stack):
    code, headers, answer = stack.login("alice", PASSWORDS["alice"], "127.0.0.2")
    assert code == 200, answer
    assert answer["kind"] == "AccessKey" and answer["apiVersion"] == "authentication.loft.sh/v1"
    assert (answer["user"], answer["username"]) == ("alice", "alice") and answer["metadata"]["name"].startswith("alice-")
    assert headers["cache-control"] == "no-store"
    key = answer["accessKey"]
    who = json.loads(stack.kubectl(key, "auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert who["username"] == "alice" and "demo:viewers" in who["groups"] and "loft:user:alice" in who["groups"]
    assert "pod" in stack.kubectl(key, "get", "pods", "-n", "team-a", "-o", "name").stdout
    listed = [line.split() for line in cli(stack.config, "accesskey", "list").splitlines()]
    row = next(row for row in listed if row[0] == answer["metadata"]["name"])
    assert row[1:3] == ["Login", "user/alice"]
    expires = time.mktime(time.strptime(row[3], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(expires - (time.time() + 3600)) < 120  # [login] key_ttl


def test_wrong_password_unknown_user_no_password_and_disabled_are_refused_alike(stack):
    cases = {"wrong": ("alice", "not-alices-password"), "unknown": ("nobody", PASSWORDS["alice"]),
             "no password": ("bob", "bobs-guess-1234"), "disabled": ("carol", PASSWORDS["carol"])}
    times: dict[str, list[float]] = {case: [] for case in cases}
    for round_ in range(FREE_FAILURES - 1):  # under the back-off, for each user and each address
        for case, (username, password) in cases.items():
            started = time.perf_counter()
            code, headers, status = stack.login(username, password, f"127.0.1.{round_ * 10 + len(times[case])}")
            times[case].append(time.perf_counter() - started)
            assert code == 401, (case, status)
            assert status == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": "Unauthorized: invalid username or password", "reason": "Unauthorized",
                              "code": 401}
    medians = {case: statistics.median(spent) for case, spent in times.items()}
    # A real argon2id check costs tens of ms; without the dummy check an unknown user would answer in ~1 ms.
    for case in ("unknown", "no password", "disabled"):
        assert 0.33 < medians[case] / medians["wrong"] < 3.0, medians
    assert medians["wrong"] > 0.01, medians


def test_a_username_two_users_share_logs_in_neither(stack):
    for name in ("twin-a", "twin-b"):
        cli(stack.config, "user", "create", name, "--username", "twin")
        cli(stack.config, "user", "set-password", name, stdin="twin-Shared-Password-7\n")
    time.sleep(0.6)  # the CLI's writes reach the worker's snapshot within a poll
    assert stack.login("twin", "twin-Shared-Password-7", "127.0.10.1")[0] == 401
    assert stack.login("twin-a", "twin-Shared-Password-7", "127.0.10.2")[0] == 401  # one logs in by username


def test_failed_logins_back_off_per_user_with_retry_after(stack):
    cli(stack.config, "user", "create", "dave")
    cli(stack.config, "user", "set-password", "dave", stdin="dave-Right-Password-4\n")
    time.sleep(0.6)  # the CLI's writes reach the worker's snapshot within a poll
    for attempt in range(FREE_FAILURES + 1):  # from a new address each time: the user's count alone
        assert stack.login("dave", "wrong-password", f"127.0.2.{attempt + 1}")[0] == 401
    code, headers, status = stack.login("dave", "dave-Right-Password-4", "127.0.2.100")
    assert code == 429, status  # even the right password waits
    assert headers["retry-after"] == "1" and status["details"] == {"retryAfterSeconds": 1}
    assert status["reason"] == "TooManyRequests" and status["code"] == 429
    assert stack.login("dave", "wrong-password", "127.0.2.101")[0] == 429
    time.sleep(1.1)
    assert stack.login("dave", "wrong-password", "127.0.2.102")[0] == 401
    time.sleep(1.2)
    code, headers, status = stack.login("dave", "dave-Right-Password-4", "127.0.2.103")
    assert code == 429 and headers["retry-after"] == "1", status  # the wait doubled: one second would be over
    time.sleep(1.0)
    assert stack.login("dave", "dave-Right-Password-4", "127.0.2.104")[0] == 200
    assert stack.login("dave", "wrong-password", "127.0.2.105")[0] == 401  # the success started the count again


def test_failed_logins_back_off_per_client_address(stack):
    for attempt in range(FREE_FAILURES + 1):  # a new (unknown) user name each time: the address's count alone
        assert stack.login(f"sprayed-{attempt}", "guess-guess", "127.0.3.1")[0] == 401
    code, headers, status = stack.login("alice", PASSWORDS["alice"], "127.0.3.1")
    assert code == 429 and int(headers["retry-after"]) >= 1, status
    assert stack.login("alice", PASSWORDS["alice"], "127.0.3.2")[0] == 200  # another address is not held back


def test_logout_revokes_the_login_key(stack):
    key = stack.login("alice", PASSWORDS["alice"], "127.0.4.1")[2]["accessKey"]
    stack.kubectl(key, "auth", "whoami")
    code, _, status = stack.request("POST", "/auth/logout", source="127.0.4.1", key=key)
    assert code == 200 and status["status"] == "Success", status
    refused = stack.kubectl(key, "get", "pods", "-n", "team-a", check=False)
    assert refused.returncode != 0 and "Unauthorized" in refused.stderr
    code, _, status = stack.request("GET", f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces/team-a/pods",
                                    source="127.0.4.1", key=key)
    assert code == 401 and status["reason"] == "Unauthorized"
    assert stack.request("POST", "/auth/logout", source="127.0.4.1", key=key)[0] == 401
    code, _, status = stack.request("POST", "/auth/logout", source="127.0.4.1", key=stack.admin_key)
    assert code == 400 and "Login access key" in status["message"]  # only Login keys are logged out
    assert stack.request("POST", "/auth/logout", source="127.0.4.1")[0] == 401
    assert stack.request("GET", "/auth/logout", source="127.0.4.1", key=stack.admin_key)[0] == 405


def sign_in(stack, source: str, origin: str | None = None, **fields: str) -> tuple[int, dict, bytes]:
    """POST the status page's sign-in form from `source`: (status, headers, page)."""
    connection = http.client.HTTPSConnection("127.0.0.1", stack.port, context=stack.context,
                                             source_address=(source, 0), timeout=30)
    try:
        connection.request("POST", "/ui/signin", body=urlencode(fields).encode(),
                           headers={"Content-Type": "application/x-www-form-urlencoded",
                                    "Origin": origin or f"https://127.0.0.1:{stack.port}"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def ui_request(stack, method: str, path: str, cookie: str, source: str) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", stack.port, context=stack.context,
                                             source_address=(source, 0), timeout=30)
    try:
        connection.request(method, path, headers={"Cookie": cookie, "Origin": f"https://127.0.0.1:{stack.port}"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def login_keys(stack, user: str) -> list[str]:
    """The names of `user`'s Login access keys, from the CLI."""
    rows = [line.split() for line in cli(stack.config, "accesskey", "list").splitlines()]
    return [row[0] for row in rows if row[1:3] == ["Login", f"user/{user}"]]


def test_the_status_page_signs_in_with_a_password_and_signing_out_revokes_its_login_key(stack):
    before = login_keys(stack, "root")
    code, headers, _ = sign_in(stack, "127.0.9.1", username="root", password=PASSWORDS["root"])
    assert code == 303 and headers["location"] == "/ui/", headers
    cookie = headers["set-cookie"].split(";")[0]
    assert PASSWORDS["root"] not in headers["set-cookie"]
    made = [name for name in login_keys(stack, "root") if name not in before]
    assert len(made) == 1  # the sign-in's own Login key, listed as the user's
    code, _, page = ui_request(stack, "GET", "/ui/", cookie, "127.0.9.1")
    assert code == 200 and b'id="clusters"' in page and b"root" in page
    code, _, status = ui_request(stack, "GET", "/ui/api/status", cookie, "127.0.9.1")
    assert code == 200 and json.loads(status)["clusters"]
    code, headers, _ = ui_request(stack, "POST", "/ui/signout", cookie, "127.0.9.1")
    assert code == 303 and "Max-Age=0" in headers["set-cookie"]
    assert made[0] not in login_keys(stack, "root")  # revoked: the cookie's key is gone with the session
    assert ui_request(stack, "GET", "/ui/api/status", cookie, "127.0.9.1")[0] == 401
    code, headers, page = ui_request(stack, "GET", "/ui/", cookie, "127.0.9.1")  # the old cookie, kept
    assert code == 200 and b'name="username"' in page and "Max-Age=0" in headers["set-cookie"]  # ...and dropped


def test_signing_out_of_a_pasted_login_key_leaves_the_key_alone(stack):
    key = stack.login("root", PASSWORDS["root"], "127.0.9.2")[2]["accessKey"]
    code, headers, _ = sign_in(stack, "127.0.9.2", key=key)
    assert code == 303, headers
    cookie = headers["set-cookie"].split(";")[0]
    assert ui_request(stack, "POST", "/ui/signout", cookie, "127.0.9.2")[0] == 303
    code, _, answer = stack.request("GET", f"{USERS}/root", source="127.0.9.2", key=key)
    assert code == 200 and answer["metadata"]["name"] == "root", answer  # the key still works


def test_the_status_page_refuses_a_wrong_password_and_a_non_admin_alike_to_auth(stack):
    code, headers, page = sign_in(stack, "127.0.9.3", username="root", password="not-roots-password")
    assert code == 401 and "set-cookie" not in headers and b"not accepted" in page
    code, _, page2 = sign_in(stack, "127.0.9.4", username="nobody", password="not-roots-password")
    assert code == 401 and b"not accepted" in page2  # an unknown user reads the same
    before = login_keys(stack, "alice")
    code, headers, page = sign_in(stack, "127.0.9.5", username="alice", password=PASSWORDS["alice"])
    assert code == 403 and "set-cookie" not in headers and b"not an administrator" in page
    assert login_keys(stack, "alice") == before  # the key made for the check was revoked at once
    code, _, page = sign_in(stack, "127.0.9.6", username="root")
    assert code == 400 and b"user name and a password" in page
    code, headers, _ = sign_in(stack, "127.0.9.6", username="root", password=PASSWORDS["root"],
                               origin="https://attacker.example")
    assert code == 403 and "set-cookie" not in headers  # the CSRF check comes first


def test_the_status_page_shares_the_login_back_off(stack):
    source = "127.0.9.7"
    for attempt in range(FREE_FAILURES + 1):  # failures at /auth/ ...
        assert stack.login(f"sprayed-ui-{attempt}", "guess-guess", source)[0] == 401
    code, headers, page = sign_in(stack, source, username="root", password=PASSWORDS["root"])
    assert code == 429 and int(headers["retry-after"]) >= 1 and b"try again in" in page  # ... hold the page back
    assert "set-cookie" not in headers
    assert stack.login("root", PASSWORDS["root"], source)[0] == 429  # and a failure at the page counts at /auth/
    source = "127.0.9.8"
    for attempt in range(FREE_FAILURES + 1):
        assert sign_in(stack, source, username=f"sprayed-ui-{attempt}", password="guess-guess")[0] == 401
    assert stack.login("root", PASSWORDS["root"], source)[0] == 429


def test_a_key_is_exchanged_for_a_short_lived_token(stack):
    key = stack.login("alice", PASSWORDS["alice"], "127.0.5.1")[2]["accessKey"]
    code, _, answer = stack.request("POST", "/auth/token", {"key": key}, source="127.0.5.1")
    assert code == 200, answer
    assert answer["kind"] == "Token" and answer["apiVersion"] == "authentication.loft.sh/v1"
    token = answer["token"]
    claims = jwt_part(token, 1)
    assert claims["sub"] == "alice" and claims["aud"] == [CLUSTER] and claims["exp"] - claims["iat"] == 300
    assert "demo:viewers" in claims["groups"]
    who = json.loads(stack.kubectl(token, "auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert who["username"] == "alice" and "demo:viewers" in who["groups"]
    assert "pod" in stack.kubectl(token, "get", "pods", "-n", "team-a", "-o", "name").stdout
    code, _, answer = stack.request("POST", "/auth/token", source="127.0.5.1", key=key)  # the bearer credential
    assert code == 200 and answer["token"] != token
    code, _, status = stack.request("POST", "/auth/token", {"key": token}, source="127.0.5.1")
    assert code == 401 and "cannot be exchanged" in status["message"]
    assert stack.request("POST", "/auth/token", {"key": "not-a-key"}, source="127.0.5.1")[0] == 401
    assert stack.request("POST", "/auth/token", {"key": 7}, source="127.0.5.1")[0] == 400
    assert stack.request("POST", "/auth/token", source="127.0.5.1")[0] == 401


def test_bad_login_requests_are_400_and_unknown_paths_404(stack):
    for body in (b"{not json", b"[]", json.dumps({"username": "alice"}).encode(),
                 json.dumps({"username": "", "password": "x"}).encode(),
                 json.dumps({"username": "alice", "password": "x" * 1025}).encode()):
        code, _, status = stack.request("POST", "/auth/password/login", body, source="127.0.6.1")
        assert code == 400 and status["kind"] == "Status", (body, status)
        assert "x" * 100 not in status["message"]
    assert stack.request("GET", "/auth/password/login", source="127.0.6.1")[0] == 405
    assert stack.request("GET", "/auth/nothing-here", source="127.0.6.1")[0] == 404
    code, _, info = stack.request("GET", "/auth/info", source="127.0.6.1")
    assert code == 200 and info["methods"] == {"password": {"enabled": True}}


def test_admins_set_a_write_only_password_through_the_management_api(stack):
    admin, source = stack.admin_key, "127.0.7.1"
    erin = {"apiVersion": "management.loft.sh/v1", "kind": "User", "metadata": {"name": "erin"},
            "spec": {"email": "erin@example.com", "password": PASSWORDS["erin"]}}
    code, _, created = stack.request("POST", USERS, erin, source=source, key=admin)
    assert code == 201, created
    reads = [created, stack.request("GET", f"{USERS}/erin", source=source, key=admin)[2],
             stack.request("GET", USERS, source=source, key=admin)[2]]
    connection = http.client.HTTPSConnection("127.0.0.1", stack.port, context=stack.context, timeout=30)
    connection.request("GET", f"{USERS}?watch=1&timeoutSeconds=1", headers={"Authorization": f"Bearer {admin}"})
    watched = connection.getresponse().read().decode()
    connection.close()
    assert '"erin"' in watched
    for read in [*map(json.dumps, reads), watched]:
        assert PASSWORDS["erin"] not in read and "password" not in read.lower() and "$argon2" not in read
    assert stack.login("erin", PASSWORDS["erin"], source)[0] == 200

    changed = "erin-Changed-Horse-5"
    code, _, patched = stack.request("PATCH", f"{USERS}/erin", {"spec": {"password": changed}}, source=source, key=admin,
                                     content_type="application/merge-patch+json")
    assert code == 200 and "password" not in json.dumps(patched), patched
    assert stack.login("erin", PASSWORDS["erin"], source)[0] == 401
    assert stack.login("erin", changed, source)[0] == 200

    code, _, status = stack.request("PATCH", f"{USERS}/erin", {"spec": {"password": "short"}}, source=source,
                                    key=admin, content_type="application/merge-patch+json")
    assert code == 422 and status["details"]["causes"][0]["field"] == "spec.password" and "short" not in status["message"]
    applied = stack.kubectl(admin, "apply", "-f", "-", input=json.dumps({**erin, "metadata": {"name": "frank"}}),
                            check=False, target="management")
    assert applied.returncode != 0 and "last-applied-configuration would keep spec.password" in applied.stderr
    assert PASSWORDS["erin"] not in applied.stderr
    assert stack.request("GET", f"{USERS}/frank", source=source, key=admin)[0] == 404
    explained = stack.kubectl(admin, "explain", "user.spec.password", target="management").stdout
    assert "Write-only, never returned" in explained

    code, _, _ = stack.request("PATCH", f"{USERS}/erin", {"spec": {"password": ""}}, source=source, key=admin,
                               content_type="application/merge-patch+json")
    assert code == 200
    assert stack.login("erin", changed, source)[0] == 401  # no password: no password login
    viewer = (stack.folder / "viewer.key").read_text().strip()
    code, _, status = stack.request("PATCH", f"{USERS}/alice", {"spec": {"password": "viewer-sets-it"}}, source=source,
                                    key=viewer, content_type="application/merge-patch+json")
    assert code == 403, status
    assert stack.login("alice", PASSWORDS["alice"], source)[0] == 200


def test_no_password_reaches_the_log_or_the_audit_log(stack):
    source = "127.0.8.1"
    stack.login("alice", PASSWORDS["alice"], source)
    stack.login("alice", "a-wrong-password-in-the-logs", source)
    code, _, _ = stack.request("PATCH", f"{USERS}/bob", {"spec": {"password": "bob-Audited-Horse-6"}}, source=source,
                               key=stack.admin_key, content_type="application/merge-patch+json")
    assert code == 200
    audit = stack.folder / "audit.log"
    deadline = time.monotonic() + 10
    while not (patches := [event for event in (json.loads(line) for line in audit.read_text().splitlines())
                           if event["requestURI"].endswith("/users/bob") and event["stage"] == "ResponseComplete"]):
        assert time.monotonic() < deadline, "the audit log did not get the patch"
        time.sleep(0.1)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    patch = patches[0]
    assert patch["requestObject"]["spec"]["password"] == "[REDACTED]"  # the body was audited, its password not
    assert any(event["requestURI"] == "/auth/password/login" for event in events)
    written = audit.read_text() + stack.gateway.log.read_text()
    for secret in (*PASSWORDS.values(), "erin-Changed-Horse-5", "a-wrong-password-in-the-logs", "bob-Audited-Horse-6",
                   "$argon2id$"):
        assert secret not in written, secret


def test_without_a_state_store_logins_are_503(gateway, tls_files):
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    for method, path, body, code, words in (
            ("POST", "/auth/password/login", b'{"username": "a", "password": "b"}', 503, "no [state] store"),
            ("POST", "/auth/token", b'{"key": "k"}', 503, "no [tokens] signing_keys_dir"),
            ("POST", "/auth/logout", None, 503, "no [state] store"),
            ("GET", "/auth/info", None, 200, '"password":{"enabled":false}')):
        connection = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=context, timeout=10)
        connection.request(method, path, body=body)
        response = connection.getresponse()
        answer = response.read().decode()
        connection.close()
        assert response.status == code and words in answer, answer
