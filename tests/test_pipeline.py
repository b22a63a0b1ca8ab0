"""The request pipeline end to end: observers see every request exactly once at its start and
finish, and the cluster registry replaces a cluster under running requests. The worker runs in a
thread of the test process; clients and the cluster are real TLS sockets and a real process."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ACCESS_KEY
from tests.inprocess import InProcessGateway, RecordingObserver
from tests.rawhttp import Client

BASE = "/kubernetes/cluster/one"
AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}


@pytest.fixture(scope="module")
def recorder():
    return RecordingObserver()


@pytest.fixture(scope="module")
def scoped_key(tmp_path_factory):
    """A state-store key that may only read configmaps, made with the real CLI."""
    folder = tmp_path_factory.mktemp("pipeline-state")
    state = folder / "state.db"
    scope = folder / "scope.json"
    scope.write_text(json.dumps({"rules": [{"verbs": ["get", "list"], "resources": [{"group": "", "resources": ["configmaps"]}]}]}))
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fastproxy", *args, "--state", str(state)],
                              check=True, capture_output=True, text=True).stdout
    cli("user", "create", "scoped")
    out = cli("accesskey", "create", "--user", "scoped", "--scope", str(scope))
    return state, next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("key: "))


@pytest.fixture(scope="module")
def inproc(gateway_config, recorder, scoped_key):
    folder, text = gateway_config
    text = textwrap.dedent(text) + f'\n[state]\npath = "{scoped_key[0]}"\n'
    server = InProcessGateway(text, folder, [recorder])
    yield server
    server.stop()


@pytest.fixture
def client(inproc, tls_files, recorder):
    recorder.clear()
    c = Client(inproc.port, tls_files["ca"])
    yield c
    c.close()


def one_request(recorder, count=1):
    finished = recorder.wait_finished(count)
    time.sleep(0.1)  # nothing else arrives late
    assert len(recorder.finished()) == count
    for seen in recorder.order:
        assert (seen.starts, seen.finishes) == (1, 1), seen.at_finish
    return [seen.at_finish for seen in finished]


def test_a_proxied_get(client, recorder):
    client.request("GET", f"{BASE}/api/v1/namespaces/dev/pods/web", AUTH)
    response = client.response()
    assert response.status == 200
    [seen] = one_request(recorder)
    assert seen["status"] == 200 and seen["user"] == "alice"
    assert (seen["verb"], seen["resource"], seen["namespace"], seen["name"]) == ("get", "pods", "dev", "web")
    assert seen["bytes_out"] > len(response.body) and seen["bytes_in"] == 0
    assert seen["first_byte"] > 0 and seen["duration"] > 0


def test_a_post_counts_the_body_it_forwarded(client, recorder):
    body = b'{"kind":"ConfigMap"}' * 100
    client.request("POST", f"{BASE}/api/v1/namespaces/dev/configmaps", AUTH, body)
    assert client.response().status == 200
    [seen] = one_request(recorder)
    assert (seen["verb"], seen["resource"], seen["bytes_in"]) == ("create", "configmaps", len(body))


def test_a_401(client, recorder):
    client.request("GET", f"{BASE}/api/v1/pods", {"Authorization": "Bearer wrong"})
    response = client.response()
    assert response.status == 401
    [seen] = one_request(recorder)
    assert seen["status"] == 401 and seen["user"] is None and "invalid access key" in seen["message"]
    assert seen["bytes_out"] > len(response.body)
    assert (seen["verb"], seen["resource"]) == ("list", "pods")


def test_a_403_scope_refusal(client, recorder, scoped_key):
    client.request("GET", f"{BASE}/api/v1/namespaces/dev/secrets", {"Authorization": f"Bearer {scoped_key[1]}"})
    response = client.response()
    assert response.status == 403, response.body
    [seen] = one_request(recorder)
    assert seen["status"] == 403 and seen["user"] == "scoped"
    assert (seen["verb"], seen["resource"], seen["namespace"]) == ("list", "secrets", "dev")


@pytest.mark.parametrize("path", ["/api", "/apis", "/api/v1", "/apis/apps/v1", "/version", "/openapi/v3"])
def test_a_narrow_scope_may_discover_its_cluster(client, scoped_key, path):
    client.request("GET", f"{BASE}{path}", {"Authorization": f"Bearer {scoped_key[1]}"})
    assert client.response().status == 200
    client.request("GET", f"{BASE}/api/v1/namespaces/dev/configmaps", {"Authorization": f"Bearer {scoped_key[1]}"})
    assert client.response().status == 200


def test_a_watch_the_client_abandons(inproc, tls_files, recorder):
    recorder.clear()
    watcher = Client(inproc.port, tls_files["ca"])
    watcher.request("GET", f"{BASE}/api/v1/namespaces/dev/pods?watch=1&interval=0.05&serve=watch", AUTH)
    response = watcher.head()
    watcher.feed_until(lambda: len(response.chunks) >= 3, "three events")
    watcher.close()
    [seen] = one_request(recorder)
    assert seen["status"] == 200 and (seen["verb"], seen["resource"]) == ("watch", "pods")
    assert seen["bytes_out"] >= sum(map(len, response.chunks))


def test_an_exec_tunnel_finishes_when_it_ends(client, recorder):
    client.send((f"POST {BASE}/api/v1/namespaces/a/pods/p/exec?serve=upgrade HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
                 f"{ACCESS_KEY}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n\r\n").encode())
    data = b""
    while b"hello from upstream\n" not in data:
        data += client.read_some()
    time.sleep(0.1)
    assert recorder.finished() == []  # a running tunnel is not finished
    client.send(b"x" * 5000)
    echoed = b""
    while len(echoed) < 5000:
        echoed += client.read_some()
    client.close()
    [seen] = one_request(recorder)
    assert seen["status"] == 101 and (seen["verb"], seen["resource"], seen["subresource"]) == ("create", "pods", "exec")
    assert seen["bytes_in"] == 5000 and seen["bytes_out"] >= 5000 + len(b"hello from upstream\n")


def test_a_pipelined_pair(client, recorder):
    client.send(b"".join(
        f"GET {BASE}/api/v1/namespaces/ns{n}/configmaps HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n"
        .encode() for n in range(2)))
    assert [client.response().status for _ in range(2)] == [200, 200]
    seen = one_request(recorder, 2)
    assert [s["namespace"] for s in seen] == ["ns0", "ns1"] and all(s["status"] == 200 for s in seen)


def test_a_503_from_a_dead_cluster(client, recorder):
    client.request("GET", "/kubernetes/cluster/down/api/v1/pods", AUTH)
    assert client.response().status == 503
    [seen] = one_request(recorder)
    assert seen["status"] == 503 and 'cluster "down" is unreachable' in seen["message"]
    assert seen["route"].cluster == "down" and seen["user"] == "alice"


def test_a_bad_path_and_bad_http_are_seen_too(client, recorder):
    client.request("GET", "/kubernetes/cluster/one/../x", AUTH)
    assert client.response().status == 400
    client.send(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert client.response().status == 400
    seen = one_request(recorder, 2)
    assert [s["status"] for s in seen] == [400, 400] and seen[0]["route"] is None


def test_a_replaced_cluster_serves_new_requests_while_an_old_watch_streams(inproc, tls_files, client, recorder):
    gateway = inproc.gateway
    old = gateway.clusters.get("one")
    watcher = Client(inproc.port, tls_files["ca"])
    watcher.request("GET", f"{BASE}/api/v1/pods?watch=1&interval=0.05&serve=watch", AUTH)
    watch = watcher.head()
    watcher.feed_until(lambda: len(watch.chunks) >= 2, "events")
    token = old.cluster.token_file.rsplit("/", 1)[0] + "/token-2"
    open(token, "w").write("the-new-credential\n")
    replaced = dataclasses.replace(old.cluster, token_file=token)
    inproc.call(gateway.clusters.put, replaced)
    try:
        client.request("GET", f"{BASE}/echo", AUTH)
        got = json.loads(client.response().body)
        assert ["Authorization", "Bearer the-new-credential"] in got["headers"]
        assert gateway.clusters.get("one") is not old and old.pool.retired
        seen_before = len(watch.chunks)
        watcher.feed_until(lambda: len(watch.chunks) >= seen_before + 5, "events after the replacement")
        assert old.pool.open_count >= 1  # the watch still holds its connection on the old pool
    finally:
        watcher.close()
        inproc.call(gateway.clusters.put, old.cluster)
    deadline = time.monotonic() + 3
    while old.pool.open_count:
        assert time.monotonic() < deadline, "the retired pool kept connections after the watch ended"
        time.sleep(0.05)
