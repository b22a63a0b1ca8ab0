"""`/grafana/CLUSTER/` through the real gateway process to a recording Grafana stand-in process."""
from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from websockets import InvalidStatus
from websockets.asyncio.client import connect

from tests.helpers import ACCESS_KEY, start_gateway, start_server

pytestmark = pytest.mark.e2e
STANDIN = Path(__file__).parent.parent / "grafana_standin.py"


@pytest.fixture(scope="module")
def grafana(tmp_path_factory):
    """The stand-in's port and a function returning the requests it recorded so far."""
    record = tmp_path_factory.mktemp("grafana") / "requests.jsonl"
    record.touch()
    standin = start_server([sys.executable, str(STANDIN), str(record)])

    def recorded() -> list[dict]:
        return [json.loads(line) for line in record.read_text().splitlines()]
    yield standin.port, recorded
    standin.stop()


@pytest.fixture(scope="module")
def gateway(grafana, gateway_config, tmp_path_factory):
    """The suite's gateway configuration (clusters "one" and "down"), with a Grafana for each: the
    stand-in for "one", a closed port for "down"."""
    base, text = gateway_config
    folder = tmp_path_factory.mktemp("gateway-grafana")
    for name in ("token", "key"):
        shutil.copy(base / name, folder / name)
    state = folder / "state.db"
    scoped_keys = {cluster: scoped_key(state, cluster) for cluster in ("one", "down")}
    process = start_gateway(text + f"""
        [state]
        path = "{state}"

        [grafana]
        user_header = "X-Grafana-User"

        [[grafana.clusters]]
        cluster = "one"
        url = "http://127.0.0.1:{grafana[0]}"
        response_header_timeout = 1

        [[grafana.clusters]]
        cluster = "down"
        url = "http://127.0.0.1:1"
    """, folder)
    process.scoped_keys = scoped_keys
    yield process
    process.stop()


def scoped_key(state, cluster: str) -> str:
    """A state-store key of user bob whose scope reaches only `cluster`, made with the CLI."""
    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "fastproxy", *args, "--state", str(state)],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout
    if cluster == "one":
        cli("user", "create", "bob", "--group", "viewers")
    scope = state.parent / f"scope-{cluster}.json"
    scope.write_text(json.dumps({"clusters": [{"cluster": cluster}]}))
    out = cli("accesskey", "create", "--user", "bob", "--name", f"bob-{cluster}", "--scope", str(scope))
    return out.split("key: ")[1].strip()


def request(gateway, tls_files, method, path, headers=(), body=None):
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    connection = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=context, timeout=10)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers:
        connection.putheader(name, value)
    if body is not None:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response, data


def last(recorded, path):
    matching = [r for r in recorded() if r["path"] == path]
    assert matching, f"the stand-in got no request for {path}"
    return matching[-1]


def names(record):
    return [name.lower() for name, _ in record["headers"]]


def value(record, name):
    values = [v for n, v in record["headers"] if n.lower() == name.lower()]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


BEARER = ("Authorization", f"Bearer {ACCESS_KEY}")


def test_the_caller_goes_to_grafana_as_its_auth_proxy_user_and_nothing_the_client_claims(gateway, grafana, tls_files):
    response, data = request(gateway, tls_files, "GET", "/grafana/one/api/dashboards/uid/abc?orgId=1", [
        BEARER, ("Cookie", f"grafana_session=s1; loft_access_key={ACCESS_KEY}; theme=dark"),
        ("X-Grafana-User", "admin"), ("X-WEBAUTH-ROLE", "Admin"), ("X-Webauth-Groups", "admins"),
        ("Impersonate-User", "root"), ("Impersonate-Group", "system:masters"), ("X-Custom", "kept")])
    assert response.status == 200, data
    assert json.loads(data) == {"path": "/api/dashboards/uid/abc?orgId=1"}, "the prefix is taken off, the query kept"
    got = last(grafana[1], "/api/dashboards/uid/abc?orgId=1")
    assert value(got, "X-Grafana-User") == "alice"
    assert value(got, "X-WEBAUTH-GROUPS") == "dev,ops"
    assert value(got, "Cookie") == "grafana_session=s1; theme=dark"
    assert value(got, "X-Custom") == "kept" and value(got, "X-Forwarded-For") == "127.0.0.1"
    assert value(got, "Host") == f"127.0.0.1:{grafana[0]}"
    assert "authorization" not in names(got) and "x-webauth-role" not in names(got)
    assert not [n for n in names(got) if n.startswith("impersonate-")]
    assert ACCESS_KEY not in json.dumps(got)


def test_a_browser_signs_in_with_the_access_key_cookie(gateway, grafana, tls_files):
    response, _ = request(gateway, tls_files, "GET", "/grafana/one/", [("Cookie", f"loft_access_key={ACCESS_KEY}")])
    assert response.status == 200
    got = last(grafana[1], "/")
    assert value(got, "X-Grafana-User") == "alice" and "cookie" not in names(got)


@pytest.mark.parametrize("path, headers, code", [
    ("/grafana/one/api/search", [], 401),
    ("/grafana/one/api/search", [("Cookie", "loft_access_key=wrong")], 401),
    ("/grafana/one/api/search", [("Authorization", "Bearer wrong"), ("Cookie", f"loft_access_key={ACCESS_KEY}")], 401),
    ("/grafana/three/api/search", [BEARER], 404),
    ("/grafana/down/api/search", [BEARER], 503),
])
def test_refusals_are_status_objects_and_reach_no_grafana(gateway, grafana, tls_files, path, headers, code):
    before = len(grafana[1]())
    response, data = request(gateway, tls_files, "GET", path, headers)
    status = json.loads(data)
    assert response.status == code and status["kind"] == "Status" and status["code"] == code
    assert len(grafana[1]()) == before


def test_an_unreachable_grafana_is_named(gateway, tls_files):
    response, data = request(gateway, tls_files, "GET", "/grafana/down/", [BEARER])
    assert response.status == 503
    assert json.loads(data)["message"].startswith('the Grafana of cluster "down" is unreachable')
    response, data = request(gateway, tls_files, "GET", "/grafana/one/slow", [BEARER])
    assert response.status == 504
    assert json.loads(data)["message"] == 'the Grafana of cluster "one" did not answer within 1s'


@pytest.mark.parametrize("origin, code", [(None, 403), ("https://evil.example.com", 403), ("own", 200)])
def test_a_cookie_changes_something_only_from_the_gateways_own_pages(gateway, grafana, tls_files, origin, code):
    headers = [("Cookie", f"loft_access_key={ACCESS_KEY}"), ("Content-Type", "application/json")]
    if origin is not None:
        headers.append(("Origin", f"https://127.0.0.1:{gateway.port}" if origin == "own" else origin))
    before = len(grafana[1]())
    response, data = request(gateway, tls_files, "POST", "/grafana/one/api/ds/query", headers, b"{}")
    assert response.status == code, data
    assert len(grafana[1]()) == before + (code == 200)


def test_a_key_whose_scope_reaches_another_cluster_is_refused(gateway, grafana, tls_files):
    before = len(grafana[1]())
    response, data = request(gateway, tls_files, "GET", "/grafana/one/api/search",
                             [("Authorization", f"Bearer {gateway.scoped_keys['down']}")])
    assert response.status == 403 and "does not reach cluster" in json.loads(data)["message"]
    assert len(grafana[1]()) == before
    response, _ = request(gateway, tls_files, "GET", "/grafana/one/api/search?scoped",
                          [("Authorization", f"Bearer {gateway.scoped_keys['one']}")])
    assert response.status == 200
    got = last(grafana[1], "/api/search?scoped")
    assert value(got, "X-Grafana-User") == "bob" and "viewers" in value(got, "X-WEBAUTH-GROUPS").split(",")


def test_redirects_and_cookies_come_back_under_the_prefix(gateway, grafana, tls_files):
    response, _ = request(gateway, tls_files, "GET", "/grafana/one/login", [BEARER])
    assert response.status == 302 and response.getheader("Location") == "/grafana/one/"
    cookies = response.headers.get_all("Set-Cookie")
    assert cookies == ["grafana_session=s3ss10n; Path=/grafana/one/; HttpOnly; SameSite=Lax", "redirect_to=; Max-Age=0"], \
        "Domain dropped, Path under the prefix, and Grafana may not set the gateway's cookie"
    response, _ = request(gateway, tls_files, "GET", "/grafana/one/own-origin", [BEARER])
    assert response.getheader("Location") == "/grafana/one/d/abc?orgId=1"
    response, _ = request(gateway, tls_files, "GET", "/grafana/one/elsewhere", [BEARER])
    assert response.getheader("Location") == "https://login.example.com/authorize?client_id=grafana"


def test_a_request_body_reaches_grafana(gateway, grafana, tls_files):
    body = json.dumps({"queries": [{"refId": "A", "expr": "up"}]}).encode()
    response, data = request(gateway, tls_files, "POST", "/grafana/one/api/ds/query", [BEARER, ("Content-Type", "application/json")], body)
    assert response.status == 200 and json.loads(data) == {"received": body.decode()}


def test_grafana_live_websocket_is_tunnelled(gateway, grafana, tls_files):
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))

    async def talk() -> list[str]:
        async with connect(f"wss://127.0.0.1:{gateway.port}/grafana/one/api/live/ws", ssl=context,
                           additional_headers={"Authorization": f"Bearer {ACCESS_KEY}", "Impersonate-User": "root"}) as socket:
            replies = []
            for text in ("subscribe", "x" * 70000):
                await socket.send(text)
                replies.append(await asyncio.wait_for(socket.recv(), 5))
            return replies
    assert asyncio.run(talk()) == ["echo:subscribe", "echo:" + "x" * 70000]
    got = last(grafana[1], "/api/live/ws")
    assert value(got, "X-Grafana-User") == "alice" and value(got, "Upgrade").lower() == "websocket"
    assert "authorization" not in names(got) and "impersonate-user" not in names(got)


def test_a_websocket_with_the_cookie_must_come_from_the_gateways_own_pages(gateway, tls_files):
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    url = f"wss://127.0.0.1:{gateway.port}/grafana/one/api/live/ws"
    cookie = {"Cookie": f"loft_access_key={ACCESS_KEY}"}

    async def talk(origin: str) -> str:
        async with connect(url, ssl=context, origin=origin, additional_headers=cookie) as socket:
            await socket.send("hello")
            return await asyncio.wait_for(socket.recv(), 5)
    assert asyncio.run(talk(f"https://127.0.0.1:{gateway.port}")) == "echo:hello"
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(talk("https://evil.example.com"))
    assert refused.value.response.status_code == 403
