"""The /oidc/ provider through the real gateway process over TLS: a relying party (authlib's client)
walks headless Chromium through the login page to its callback, and the ID token is verified with
PyJWT against the JWKS; then the hostile cases, each refused with its OAuth error."""
from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import re
import secrets
import ssl
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
from authlib.integrations.requests_client import OAuth2Session
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from devcluster.process import start_devcluster
from fastproxy.demo import VIEWER_RULES, prepare
from tests.e2e.test_kubectl_through_gateway import free_port
from tests.e2e.test_login import cli
from tests.helpers import start_gateway

pytestmark = pytest.mark.e2e

CLIENT_ID = "dashboard"
PASSWORD = "alice-Correct-Horse-1"
CODE_TTL = 5  # short, for the expired-code test; room enough for a loaded machine's token requests
SCOPE = "openid profile email groups offline_access"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--ignore-certificate-errors")  # the test's throwaway CA only


class Callback(http.server.BaseHTTPRequestHandler):
    """The relying party's redirect URI: records what reaches it."""

    received: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        Callback.received.append(self.path)
        body = b"<!doctype html><title>signed in</title><p id=done>signed in</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Stack:
    def __init__(self, port: int, ca: str, secret: str, callback: str, folder, admin_key: str):
        self.port, self.ca, self.secret, self.callback, self.folder = port, ca, secret, callback, folder
        self.issuer = f"https://127.0.0.1:{port}/oidc"
        self.admin_key = admin_key
        self.context = ssl.create_default_context(cafile=ca)

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=30)
        data = urlencode(body).encode() if body is not None else None
        all_headers = {**({"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}),
                       **(headers or {})}
        try:
            connection.request(method, path, body=data, headers=all_headers)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def authorize_query(self, **changes: str | None) -> dict:
        verifier = secrets.token_urlsafe(48)
        query = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": self.callback, "scope": SCOPE,
                 "state": "state-1", "nonce": "nonce-1", "code_challenge_method": "S256",
                 "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode(),
                 "verifier": verifier}
        query.update(changes)
        return {name: value for name, value in query.items() if value is not None}

    def code(self, **changes: str | None) -> tuple[str, str]:
        """Log in through the form without a browser: (code, verifier)."""
        query = self.authorize_query(**changes)
        verifier = query.pop("verifier")
        status, headers, page = self.request("GET", "/oidc/authorize?" + urlencode(query))
        assert status == 200, page
        cookie = headers["set-cookie"].split(";")[0]
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()
        status, headers, body = self.request("POST", "/oidc/authorize",
                                             {**query, "csrf_token": csrf, "username": "alice", "password": PASSWORD},
                                             {"Cookie": cookie})
        assert status == 302, body
        return parse_qs(urlsplit(headers["location"]).query)["code"][0], verifier

    def token(self, form: dict, secret: str | None = None) -> tuple[int, dict]:
        credentials = base64.b64encode(f"{CLIENT_ID}:{secret or self.secret}".encode()).decode()
        status, _, body = self.request("POST", "/oidc/token", form, {"Authorization": f"Basic {credentials}"})
        return status, json.loads(body)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oidc")
    cluster = start_devcluster(folder / "cluster", rules=VIEWER_RULES)
    callback_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Callback)
    threading.Thread(target=callback_server.serve_forever, daemon=True).start()
    callback = f"http://127.0.0.1:{callback_server.server_address[1]}/callback"
    gateway = None
    try:
        port = free_port()
        config = prepare(folder, cluster.url, cluster.ca_file, cluster.gateway_token_file, f"127.0.0.1:{port}")
        secret = secrets.token_urlsafe(32)
        # Two workers: a token request may reach another worker than its authorize request did.
        config.write_text(config.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1) + f"""
[oidc]
issuer = "https://127.0.0.1:{port}/oidc"
code_ttl = {CODE_TTL}

[[oidc.clients]]
id = "{CLIENT_ID}"
name = "the dashboard"
secret_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"
redirect_uris = ["{callback}"]
""")
        cli(config, "user", "create", "alice", "--group", "demo:viewers", "--email", "alice@example.com")
        cli(config, "user", "set-password", "alice", stdin=PASSWORD + "\n")
        gateway = start_gateway(config.read_text(), folder)
        yield Stack(port, str(folder / "gateway-tls" / "ca.crt"), secret, callback, folder,
                    (folder / "admin.key").read_text().strip())
        log = (folder / "gateway.log").read_text()
        assert "Traceback" not in log and PASSWORD not in log and secret not in log
    finally:
        if gateway is not None:
            gateway.stop()
        callback_server.shutdown()
        cluster.stop()


def test_a_relying_party_logs_alice_in_through_chromium_and_verifies_the_id_token(stack, tmp_path):
    session = OAuth2Session(CLIENT_ID, stack.secret, scope=SCOPE, redirect_uri=stack.callback,
                            code_challenge_method="S256")
    session.verify, session.trust_env = stack.ca, False  # this CA, not the environment's bundle
    discovery = session.get(f"{stack.issuer}/.well-known/openid-configuration", withhold_token=True).json()
    assert discovery["issuer"] == stack.issuer and discovery["code_challenge_methods_supported"] == ["S256"]
    verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    url, state = session.create_authorization_url(discovery["authorization_endpoint"], code_verifier=verifier, nonce=nonce)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(url)
        assert browser.title == "Log in" and "the dashboard" in browser.page_source
        browser.find_element(By.ID, "username").send_keys("alice")
        browser.find_element(By.ID, "password").send_keys("wrong-password")
        browser.find_element(By.ID, "login").click()
        WebDriverWait(browser, 10).until(lambda b: "Invalid username or password." in b.page_source)
        browser.find_element(By.ID, "username").send_keys("alice")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login").click()
        WebDriverWait(browser, 15).until(lambda b: b.current_url.startswith(stack.callback))
        arrived = browser.current_url
        reached = urlsplit(arrived)
        assert "signed in" in browser.page_source and f"{reached.path}?{reached.query}" in Callback.received
        assert parse_qs(urlsplit(arrived).query)["state"] == [state]
        token = session.fetch_token(discovery["token_endpoint"], authorization_response=arrived, code_verifier=verifier)
    finally:
        browser.quit()
    signing_key = jwt.PyJWKClient(discovery["jwks_uri"], ssl_context=stack.context).get_signing_key_from_jwt(token["id_token"])
    claims = jwt.decode(token["id_token"], signing_key.key, algorithms=discovery["id_token_signing_alg_values_supported"],
                        audience=CLIENT_ID, issuer=stack.issuer)
    assert claims["sub"] == "alice" and claims["preferred_username"] == "alice" and claims["nonce"] == nonce
    assert claims["email"] == "alice@example.com" and "demo:viewers" in claims["groups"]
    info = session.get(discovery["userinfo_endpoint"]).json()
    assert info["sub"] == "alice" and "demo:viewers" in info["groups"]
    # Neither token is a gateway credential.
    for credential in (token["id_token"], token["access_token"]):
        status, _, _ = stack.request("GET", "/kubernetes/management/apis/management.loft.sh/v1/users",
                                     headers={"Authorization": f"Bearer {credential}"})
        assert status == 401
    # A refresh answers new tokens once; the used refresh token is refused.
    status, refreshed = stack.token({"grant_type": "refresh_token", "refresh_token": token["refresh_token"]})
    assert status == 200 and refreshed["access_token"] != token["access_token"], refreshed
    status, again = stack.token({"grant_type": "refresh_token", "refresh_token": token["refresh_token"]})
    assert (status, again["error"]) == (400, "invalid_grant")
    for secret in (token["access_token"], token["refresh_token"], token["id_token"], parse_qs(urlsplit(arrived).query)["code"][0]):
        assert secret not in (stack.folder / "gateway.log").read_text()


@pytest.mark.parametrize("redirect_uri", ["https://evil.example/callback", "{callback}/../evil", "{callback}?next=x",
                                          "//evil.example/callback"])
def test_an_unregistered_redirect_uri_is_refused_without_a_redirect(stack, redirect_uri):
    for changes in ({}, {"code_challenge": None}, {"response_type": "token"}):  # errors that would redirect
        query = stack.authorize_query(redirect_uri=redirect_uri.format(callback=stack.callback), **changes)
        status, headers, body = stack.request("GET", "/oidc/authorize?" + urlencode(query))
        assert status == 400 and "location" not in headers, (status, headers)
        assert json.loads(body)["error"] in ("invalid_request", "unsupported_response_type")


@pytest.mark.parametrize("changes", [{"code_challenge": None}, {"code_challenge_method": "plain"},
                                     {"code_challenge_method": None}])
def test_an_authorize_request_without_s256_pkce_is_sent_back_with_invalid_request(stack, changes):
    status, headers, _ = stack.request("GET", "/oidc/authorize?" + urlencode(stack.authorize_query(**changes)))
    assert status == 302
    location = urlsplit(headers["location"])
    assert location.geturl().startswith(stack.callback + "?")
    assert parse_qs(location.query)["error"] == ["invalid_request"] and parse_qs(location.query)["state"] == ["state-1"]


def test_the_code_needs_its_verifier_and_works_once(stack):
    code, verifier = stack.code()
    status, answer = stack.token({"grant_type": "authorization_code", "code": code, "redirect_uri": stack.callback})
    assert (status, answer["error"]) == (400, "invalid_request")  # no verifier: and the code is used up
    code, verifier = stack.code()
    status, answer = stack.token({"grant_type": "authorization_code", "code": code, "redirect_uri": stack.callback,
                                  "code_verifier": secrets.token_urlsafe(48)})
    assert (status, answer["error"]) == (400, "invalid_grant")
    code, verifier = stack.code()
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": stack.callback, "code_verifier": verifier}
    status, answer = stack.token(form, secret="not-the-secret")
    assert (status, answer["error"]) == (401, "invalid_client")
    code, verifier = stack.code()
    form["code"], form["code_verifier"] = code, verifier
    status, answer = stack.token(form)
    assert status == 200 and answer["token_type"] == "Bearer" and answer["id_token"], answer
    status, answer = stack.token(form)
    assert (status, answer["error"]) == (400, "invalid_grant")  # reused


def test_an_expired_code_is_refused(stack):
    code, verifier = stack.code()
    time.sleep(CODE_TTL + 0.5)
    status, answer = stack.token({"grant_type": "authorization_code", "code": code, "redirect_uri": stack.callback,
                                  "code_verifier": verifier})
    assert (status, answer["error"]) == (400, "invalid_grant")


def test_a_login_post_without_the_csrf_token_is_refused(stack):
    query = stack.authorize_query()
    query.pop("verifier")
    status, headers, page = stack.request("GET", "/oidc/authorize?" + urlencode(query))
    cookie = headers["set-cookie"].split(";")[0]
    assert "Secure" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    assert "default-src 'none'" in headers["content-security-policy"] and b"<script" not in page
    login = {**query, "username": "alice", "password": PASSWORD}
    for form, extra in (({**login}, {"Cookie": cookie}), ({**login, "csrf_token": "forged"}, {"Cookie": cookie}),
                        ({**login, "csrf_token": cookie.split("=", 1)[1]}, {})):
        status, headers, body = stack.request("POST", "/oidc/authorize", form, extra)
        assert status == 400 and "location" not in headers and json.loads(body)["error"] == "invalid_request"


def test_a_login_post_for_another_redirect_uri_is_refused_without_a_redirect(stack):
    query = stack.authorize_query()
    query.pop("verifier")
    status, headers, page = stack.request("GET", "/oidc/authorize?" + urlencode(query))
    cookie = headers["set-cookie"].split(";")[0]
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()
    form = {**query, "redirect_uri": "https://evil.example/callback", "csrf_token": csrf, "username": "alice",
            "password": PASSWORD}
    status, headers, body = stack.request("POST", "/oidc/authorize", form, {"Cookie": cookie})
    assert status == 400 and "location" not in headers and json.loads(body)["error"] == "invalid_request"
