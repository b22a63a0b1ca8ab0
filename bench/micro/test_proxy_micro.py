"""Micro-benchmarks of the per-request work on the gateway's hot path.

Run: .venv/bin/pytest bench/micro --benchmark-enable
"""
from __future__ import annotations

import pytest

from bench.micro.support import gateway_config, parse_head, plan
from fastproxy.gateway import Gateway
from fastproxy.headers import client_response_head, relay_response_head, scan_client_headers
from fastproxy.routing import route

KEY = "bench-access-key-0123456789abcdef"
KUBECTL_HEAD = (
    b"GET /kubernetes/cluster/prod/api/v1/namespaces/default/pods?limit=500 HTTP/1.1\r\n"
    b"Host: gateway.example.com:8443\r\n"
    b"User-Agent: kubectl/v1.32.4 (linux/amd64) kubernetes/59526cd\r\n"
    b"Accept: application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    b"Kubectl-Command: kubectl get\r\n"
    b"Kubectl-Session: 0f4c7a3e-1b2d-4c5e-8f9a-0b1c2d3e4f5a\r\n"
    b"Accept-Encoding: gzip\r\n\r\n"
)
RESPONSE_HEADERS = [
    (b"Audit-Id", b"7c1f9a52-3b7e-4d8a-9f1e-2a3b4c5d6e7f"), (b"Cache-Control", b"no-cache, private"),
    (b"Content-Type", b"application/json"), (b"X-Kubernetes-Pf-Flowschema-Uid", b"a1b2"),
    (b"X-Kubernetes-Pf-Prioritylevel-Uid", b"c3d4"), (b"Date", b"Sun, 22 Nov 2026 20:00:00 GMT"),
    (b"Content-Length", b"1043"),
]


def parsed_head():
    return parse_head(KUBECTL_HEAD)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    return Gateway(gateway_config(tmp_path_factory.mktemp("micro"), KEY, groups=["dev", "ops"]), loop=None)


def test_parse_request_head(benchmark):
    head = benchmark(parsed_head)
    assert head.method == b"GET" and len(head.headers) == 7


def test_route(benchmark):
    r = benchmark(route, "/kubernetes/cluster/prod/api/v1/namespaces/default/pods?limit=500")
    assert r.cluster == "prod"


def test_scan_client_headers(benchmark):
    headers = parsed_head().headers
    found = benchmark(scan_client_headers, headers)
    assert found.authorization.startswith(b"Bearer ") and len(found.kept) == 5


def test_plan_request(benchmark, gateway):
    """Route + header pass + key lookup + upstream head: all the gateway adds per request."""
    head = parsed_head()
    responder = benchmark(plan, gateway, head)
    assert b"Impersonate-User: bench-user\r\n" in responder.plan.head


def test_client_response_head(benchmark):
    head = benchmark(client_response_head, 200, RESPONSE_HEADERS, keep_alive=True)
    assert head.startswith(b"HTTP/1.1 200 OK\r\nAudit-Id:")


# nginx's answer to the small GET of scripts/bench: one hop-by-hop line, Connection: keep-alive.
UPSTREAM_HEAD = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 02:00:00 GMT\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1043\r\nLast-Modified: Fri, 04 Dec 2026 01:00:00 GMT\r\n"
                 b"Connection: keep-alive\r\nETag: \"6750a1b0-413\"\r\nAccept-Ranges: bytes\r\n\r\n")


def test_relay_response_head(benchmark):
    head = benchmark(relay_response_head, UPSTREAM_HEAD, keep_alive=True)
    assert head == UPSTREAM_HEAD.replace(b"Connection: keep-alive\r\n", b"")
