"""Micro-benchmarks of the response relay: upstream bytes in, client bytes out, no sockets.

Run: .venv/bin/pytest bench/micro --benchmark-enable
"""
from __future__ import annotations

import time

import pytest

from bench.micro.support import NullTransport, gateway_config
from fastproxy.client import ClientConnection
from fastproxy.context import RequestHead
from fastproxy.gateway import Gateway
from fastproxy.upstream import UpstreamConnection

KEY = "bench-access-key-0123456789abcdef"
BODY = b'{"kind":"PodList","items":[' + b'{"metadata":{"name":"web"}},' * 35 + b'{}]}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nAudit-Id: 7c1f9a52-3b7e-4d8a-9f1e-2a3b4c5d6e7f\r\n"
            b"Cache-Control: no-cache, private\r\nContent-Type: application/json\r\n"
            b"Date: Sun, 22 Nov 2026 20:00:00 GMT\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
EVENT = b'{"type":"MODIFIED","object":{"kind":"Pod","metadata":{"name":"web-0","resourceVersion":"1"}}}\n'
WATCH_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


class Clock:
    time = staticmethod(time.monotonic)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    # Each watch on its own upstream stream: what is measured is relaying one, not a shared stream.
    config = gateway_config(tmp_path_factory.mktemp("relay"), KEY, server={"share_watches": False})
    gateway = Gateway(config, Clock())
    client = ClientConnection(gateway)
    client.connection_made(NullTransport())
    upstream = gateway.clusters.get("prod")
    conn = UpstreamConnection(upstream.pool)
    conn.connection_made(NullTransport())
    upstream.pool.open_count = 1

    def plan(target: bytes):
        """A new responder for the request, as the router makes one per request."""
        head = RequestHead(b"GET", target, b"1.1", [(b"Authorization", b"Bearer " + KEY.encode())], b"10.0.0.7")
        return lambda: gateway.responder(client, head, True)
    return client, conn, plan


def test_relay_small_response(benchmark, parts):
    """Attach a pooled connection, relay head + 1 KB body, give the connection back."""
    client, conn, plan = parts
    new_exchange = plan(b"/kubernetes/cluster/prod/api/v1/namespaces/default/pods")

    def exchange():
        exchange = new_exchange()
        exchange.request_done = True
        client.active = exchange
        exchange.upstream_ready(conn)
        conn.pool.idle.clear()
        return (exchange, conn), {}

    def relay(exchange, conn):
        conn.data_received(RESPONSE)
        return exchange

    done = benchmark.pedantic(relay, setup=exchange, rounds=20_000, warmup_rounds=200)
    assert done.finished and conn.pool.idle == [conn]


def test_relay_watch_event(benchmark, parts):
    """One chunked watch event from the cluster to the client."""
    client, conn, plan = parts
    exchange = plan(b"/kubernetes/cluster/prod/api/v1/pods?watch=1")()
    client.active = exchange
    exchange.upstream_ready(conn)
    conn.data_received(WATCH_HEAD)
    chunk = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
    benchmark(conn.data_received, chunk)
    assert conn.head_done and not conn.complete and exchange.upstream is conn
