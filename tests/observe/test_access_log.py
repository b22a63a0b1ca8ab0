"""The access log: its table, the line of a request (pure), sampling, and a running gateway whose
X-Request-Id header, access-log line and audit events name each request with the same id."""
from __future__ import annotations

import json
import math
import random
import textwrap
import time
import uuid

import pytest

from fastproxy.auth.identity import Identity
from fastproxy.config import ConfigError, parse_config
from fastproxy.context import RequestContext, RequestHead, RequestIds
from fastproxy.observe.accesslog import AccessLog, access_line, parse_access_log_config
from fastproxy.routing import route
from tests.helpers import ACCESS_KEY, start_gateway
from tests.observe.test_metrics_gateway import ADMIN, gateway_text, sample, scrape
from tests.rawhttp import Client

BASE = "/kubernetes/cluster/one"
AUTH = {"Authorization": f"Bearer {ACCESS_KEY}", "User-Agent": "access-test/1.0"}


def finished(target: str, status: int = 200, method: bytes = b"GET", headers=(), *, routed: bool = True) -> RequestContext:
    ctx = RequestContext(RequestHead(method, target.encode(), b"1.1", list(headers), b"10.1.2.3"), 100.0)
    if routed:
        ctx.route = route(target)
    ctx.status, ctx.bytes_in, ctx.bytes_out, ctx.first_byte, ctx.ended = status, 0, 1460, 100.002, 100.0035
    return ctx


class Lines:
    """A sink keeping what the writer thread hands it."""

    def __init__(self):
        self.lines: list[bytes] = []

    def write(self, lines):  # a batch's lines come as one run
        self.lines += b"".join(lines).splitlines(keepends=True)

    def maintain(self):
        pass

    def close(self):
        pass


# --- the table -------------------------------------------------------------------------------------

def test_on_by_default_to_standard_error_sampling_successes():
    config = parse_config({}).access_log
    assert config is not None and (config.path, config.sample, config.sample_errors) == ("-", 0.01, 1.0)
    assert parse_config({"access_log": {"enabled": False}}).access_log is None


def test_a_file_with_rotation(tmp_path):
    config = parse_access_log_config({"path": str(tmp_path / "access.log"), "sample": 1, "max_size_mb": 10,
                                      "max_backups": 2, "compress": False})
    assert (config.sample, config.max_size_mb, config.max_backups, config.compress) == (1.0, 10.0, 2, False)


@pytest.mark.parametrize(("table", "message"), [
    ({"sample": 1.5}, "access_log.sample: must be between 0 and 1, not 1.5"),
    ({"sample_errors": -0.1}, "access_log.sample_errors: must be >= 0, not -0.1"),
    ({"sample": math.nan}, "access_log.sample: must be a finite number, not nan"),
    ({"sample": "all"}, "access_log.sample: must be a number, not 'all'"),
    ({"path": ""}, "access_log.path: must not be empty"),
    ({"path": "/no/such/folder/access.log"}, "access_log.path: folder not found: /no/such/folder"),
    ({"enabled": False, "sampel": 1}, "access_log.sampel: unknown key"),  # checked even when off
])
def test_bad_tables_name_the_key(table, message):
    with pytest.raises(ConfigError) as error:
        parse_config({"access_log": table})
    assert str(error.value).startswith(message)


# --- the line --------------------------------------------------------------------------------------

def test_the_line_of_a_proxied_get():
    ctx = finished(f"{BASE}/api/v1/namespaces/dev/configmaps/web?resourceVersion=0",
                   headers=[(b"Authorization", b"Bearer secret"), (b"User-Agent", b"kubectl/v1.33.0")])
    RequestIds().assign(ctx)
    ctx.identity = Identity("alice", ("dev",), "alice-key", b"")
    line = access_line(ctx, 1_764_748_800.25)
    assert line == {
        "time": "2025-12-03T08:00:00.250Z", "id": ctx.request_id, "remote": "10.1.2.3", "method": "GET",
        "endpoint": "cluster", "path": "/api/v1/namespaces/dev/configmaps/web", "query": "resourceVersion=0",
        "cluster": "one", "verb": "get", "resource": "configmaps", "namespace": "dev", "name": "web",
        "user": "alice", "credential": "alice-key", "code": 200, "bytesIn": 0, "bytesOut": 1460,
        "duration": 0.0035, "upstream": 0.002, "userAgent": "kubectl/v1.33.0",
    }
    assert "secret" not in json.dumps(line)


def test_a_subresource_and_a_refusal():
    ctx = finished(f"{BASE}/api/v1/namespaces/dev/pods/web/log?follow=true", 401)
    ctx.message, ctx.first_byte = "invalid access key", 0.0
    line = access_line(ctx, 0.0)
    assert (line["resource"], line["code"], line["message"], "user" in line, "upstream" in line) == \
        ("pods/log", 401, "invalid access key", False, False)


def test_no_query_outside_the_kubernetes_apis():
    """An OAuth callback's code and state travel in the query: never in the log."""
    line = access_line(finished("/oidc/callback?code=secret-code&state=s"), 0.0)
    assert (line["endpoint"], line["path"], "query" in line) == ("oidc", "/callback", False)
    unrouted = access_line(finished("/nowhere/../x?code=secret-code", 400, routed=False), 0.0)
    assert (unrouted["endpoint"], unrouted["path"]) == ("none", "/nowhere/../x")
    assert "secret-code" not in json.dumps(unrouted)


def test_sampling_successes_and_errors_apart():
    lines = Lines()
    log = AccessLog(parse_access_log_config({"sample": 0, "sample_errors": 1}), sink=lines)
    try:
        log.finish_batch([finished(f"{BASE}/api/v1/pods", status) for status in (200, 304, 403, 502, 0, 201)])
        assert log.writer.flush()
    finally:
        log.close()
    assert [json.loads(line)["code"] for line in lines.lines] == [403, 502, 0]


@pytest.mark.parametrize("rate", [0.01, 0.3, 0.9])
def test_each_request_is_logged_with_its_rate(rate):
    lines = Lines()
    log = AccessLog(parse_access_log_config({"sample": rate, "sample_errors": 0}), sink=lines)
    log.random = random.Random(7).random
    count = 100_000
    try:
        for start in range(0, count, 1000):  # batches, as the gateway's flushes hand them over
            log.finish_batch([finished(f"{BASE}/api/v1/namespaces/dev/configmaps/c{n}", 500 if n % 2 else 200)
                              for n in range(start, start + 1000)])
        assert log.writer.flush()
    finally:
        log.close()
    logged = [int(json.loads(line)["path"].rsplit("/c", 1)[1]) for line in lines.lines]
    assert all(n % 2 == 0 for n in logged) and logged == sorted(set(logged))  # successes only, none twice
    successes = count // 2
    assert abs(len(logged) / successes - rate) < 4 * math.sqrt(rate * (1 - rate) / successes)
    halves = sum(1 for n in logged if n < count // 2), sum(1 for n in logged if n >= count // 2)
    assert abs(halves[0] - halves[1]) < 6 * math.sqrt(len(logged))  # spread evenly, not bunched


# --- a running gateway -----------------------------------------------------------------------------

def read_lines(path, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]] if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_one_id_in_the_header_the_access_log_and_the_audit_log(gateway_config, tmp_path, tls_files):
    access, audit = tmp_path / "access.log", tmp_path / "audit.log"
    folder, text = gateway_text(gateway_config, tmp_path, f"""
        [access_log]
        path = "{access}"
        sample = 1.0
        [audit]
        path = "{audit}"
    """)
    gateway = start_gateway(text, folder)
    client = Client(gateway.port, tls_files["ca"])
    try:
        answers = []
        for path, headers in ((f"{BASE}/api/v1/namespaces/dev/configmaps/web", AUTH),
                              (f"{BASE}/api/v1/pods", {"Authorization": "Bearer not-a-key"}),
                              ("/nowhere", {})):
            client.request("GET", path, headers)
            answers.append(client.response())
        assert [answer.status for answer in answers] == [200, 401, 404]
        ids = [answer.header("X-Request-Id") for answer in answers]
        assert all(uuid.UUID(request_id).version == 4 for request_id in ids) and len(set(ids)) == 3
        lines = read_lines(access, 3)
        assert [(line["id"], line["code"]) for line in lines] == list(zip(ids, [200, 401, 404]))
        assert (lines[0]["user"], lines[0]["credential"], lines[0]["userAgent"]) == ("alice", "alice-key", "access-test/1.0")
        assert lines[1]["message"] == "Unauthorized: invalid access key" and "user" not in lines[1]
        events = [json.loads(line) for line in audit.read_bytes().split(b"\n")[:-1]]
        assert [e["auditID"] for e in events if e["stage"] == "ResponseComplete"] == ids
        for text_written in (access.read_text(), audit.read_text(), gateway.log.read_text()):
            assert ACCESS_KEY not in text_written and "not-a-key" not in text_written
    finally:
        client.close()
        gateway.stop()


def test_a_full_disk_drops_lines_never_requests(gateway_config, tmp_path, tls_files):
    folder, text = gateway_text(gateway_config, tmp_path, textwrap.dedent("""
        [access_log]
        path = "/dev/full"
        sample = 1.0
    """))
    gateway = start_gateway(text, folder)
    client = Client(gateway.port, tls_files["ca"])
    try:
        for _ in range(20):
            client.request("GET", f"{BASE}/api/v1/namespaces/dev/configmaps/web", AUTH)
            assert client.response().status == 200
        deadline = time.monotonic() + 10
        while (dropped := sample(scrape(gateway.port, tls_files["ca"], ADMIN), "fastproxy_log_lines_total",
                                 log="access", outcome="dropped")) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dropped >= 20
        assert "access log: " in gateway.log.read_text()  # the writer's warning: lines dropped, and why
    finally:
        client.close()
        gateway.stop()
