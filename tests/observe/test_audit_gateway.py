"""The audit observer in a running gateway (the worker in a thread of the test process, clients and
the cluster real TLS sockets): what a proxied GET, a refusal, a watch and the management API write."""
from __future__ import annotations

import json
import textwrap
import time

import pytest

from fastproxy.observe.audit import AuditObserver, parse_audit_config
from tests.helpers import ACCESS_KEY
from tests.inprocess import InProcessGateway
from tests.rawhttp import Client

BASE = "/kubernetes/cluster/one"
AUTH = {"Authorization": f"Bearer {ACCESS_KEY}", "User-Agent": "audit-test/1.0"}


@pytest.fixture(scope="module")
def audited(gateway_config, tmp_path_factory):
    folder, text = gateway_config
    log = tmp_path_factory.mktemp("audit") / "audit.log"
    audit = AuditObserver(parse_audit_config({"path": str(log)}))
    server = InProcessGateway(textwrap.dedent(text), folder, [audit])
    yield server, audit, log
    server.stop()
    audit.close()


@pytest.fixture
def client(audited, tls_files):
    c = Client(audited[0].port, tls_files["ca"])
    yield c
    c.close()


def events(audited, auditID=None):
    """The events written so far (the lines complete: the writer thread may be writing more)."""
    _, audit, log = audited
    assert audit.flush()
    lines = log.read_bytes().split(b"\n")[:-1] if log.exists() else []
    found = [json.loads(line) for line in lines]
    return [e for e in found if auditID is None or e["auditID"] == auditID]


def last_request(audited, response):
    """The events of the request `response` answered (its X-Request-Id is their auditID), once its
    last one is written: the client may have its response before the gateway has finished the
    request, and the events are made every 0.1 s."""
    audit_id = response.header("X-Request-Id")
    deadline = time.monotonic() + 5
    while True:
        found = events(audited, audit_id)
        if found and found[-1]["stage"] in ("ResponseComplete", "Panic"):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.01)


def test_a_proxied_get(audited, client):
    client.request("GET", f"{BASE}/api/v1/namespaces/dev/pods/web", AUTH)
    response = client.response()
    assert response.status == 200
    received, complete = last_request(audited, response)
    assert (received["stage"], complete["stage"]) == ("RequestReceived", "ResponseComplete")
    assert complete["user"] == {"username": "alice", "groups": ["dev", "ops"]} and complete["verb"] == "get"
    assert complete["objectRef"] == {"resource": "pods", "namespace": "dev", "name": "web", "apiVersion": "v1"}
    assert complete["sourceIPs"] == ["127.0.0.1"] and complete["userAgent"] == "audit-test/1.0"
    assert complete["responseStatus"] == {"metadata": {}, "code": 200}
    assert complete["annotations"] == {"fastproxy/requestTarget": "Cluster", "fastproxy/cluster": "one",
                                       "fastproxy/accessKey": "alice-key"}
    assert ACCESS_KEY not in audited[2].read_text()


def test_an_unknown_key(audited, client):
    client.request("GET", f"{BASE}/api/v1/pods", {"Authorization": "Bearer not-a-key"})
    response = client.response()
    assert response.status == 401
    complete = last_request(audited, response)[-1]
    assert complete["user"] == {} and complete["responseStatus"]["reason"] == "Unauthorized"
    assert "invalid access key" in complete["responseStatus"]["message"]
    assert "not-a-key" not in audited[2].read_text()


def test_a_watch_logs_response_started_while_it_streams(audited, tls_files):
    server, audit, _ = audited
    watcher = Client(server.port, tls_files["ca"])
    watcher.request("GET", f"{BASE}/api/v1/namespaces/dev/pods?watch=1&interval=0.05&serve=watch", AUTH)
    response = watcher.head()
    watcher.feed_until(lambda: len(response.chunks) >= 2, "two events")
    server.call(server.worker.gateway.observers.flush)  # as the gateway's once-a-second tick: the batches first,
    server.call(audit.tick)                              # then ResponseStarted
    streaming = events(audited, response.header("X-Request-Id"))
    assert [e["stage"] for e in streaming] == ["RequestReceived", "ResponseStarted"]
    assert streaming[1]["responseStatus"] == {"metadata": {}, "code": 200} and streaming[1]["verb"] == "watch"
    watcher.close()  # the client leaves: the watch finishes
    deadline = time.monotonic() + 5
    while len(events(audited, streaming[0]["auditID"])) < 3:
        assert time.monotonic() < deadline, "the watch was not finished"
        time.sleep(0.02)
    stages = events(audited, streaming[0]["auditID"])
    assert [e["stage"] for e in stages] == ["RequestReceived", "ResponseStarted", "ResponseComplete"]
    assert stages[2]["responseStatus"]["code"] == 200


def test_the_management_api(audited, client):
    client.request("GET", "/kubernetes/management/version", AUTH)
    response = client.response()
    assert response.status == 200
    complete = last_request(audited, response)[-1]
    assert complete["requestURI"] == "/version" and complete["verb"] == "get" and "objectRef" not in complete
    assert complete["annotations"] == {"fastproxy/requestTarget": "Management", "fastproxy/accessKey": "alice-key"}


def test_the_headers_of_a_proxied_request_as_the_proxy_scanned_them(audited, client):
    """userAgent and sourceIPs come from the proxy's own pass over the headers (RequestContext.found)."""
    headers = {**AUTH, "X-Forwarded-For": "10.0.0.1, 10.0.0.2", "x-real-ip": "10.0.0.3", "User-Agent": "scanned/2"}
    client.request("GET", f"{BASE}/api/v1/namespaces/dev/pods/web", headers)
    response = client.response()
    assert response.status == 200
    for event in last_request(audited, response):
        assert event["sourceIPs"] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "127.0.0.1"]
        assert event["userAgent"] == "scanned/2"
