"""The gateway's own requests (upstream_client.request) through a real pool to the TLS test upstream."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from fastproxy.clusters import Upstream, upstream_ssl_context
from fastproxy.config import parse_config
from fastproxy.upstream import Pool
from fastproxy.upstream_client import UpstreamRequestError, request


@pytest.fixture
def clusters(upstream, tls_files, tmp_path):
    (tmp_path / "token").write_text("gateway-credential-for-upstream\n")
    config = parse_config({"clusters": [
        {"name": "one", "server": f"https://127.0.0.1:{upstream.port}", "ca_file": str(tls_files["ca"]),
         "token_file": str(tmp_path / "token"), "response_header_timeout": 3},
        {"name": "down", "server": "https://127.0.0.1:1", "ca_file": str(tls_files["ca"]),
         "token_file": str(tmp_path / "token")},
    ]})
    return config.clusters


def run(clusters, scenario):
    """Run `scenario(upstreams)` on a fresh event loop with one pool per cluster."""
    async def main():
        loop = asyncio.get_running_loop()
        upstreams = {c.name: Upstream(c, Pool(loop, c, upstream_ssl_context(c))) for c in clusters}
        try:
            return await scenario(upstreams)
        finally:
            for item in upstreams.values():
                item.pool.close()
    return asyncio.run(main())


def pool_state(pool):
    return pool.open_count, len(pool.idle)


def test_request_runs_as_the_gateway_and_reuses_the_pool(clusters):
    async def scenario(up):
        first = await request(up["one"], "POST", "/api/v1/echo?x=1", b'{"a":1}',
                              [("Content-Type", "application/json")])
        second = await request(up["one"], "GET", "/api/v1/echo")
        return first, second, pool_state(up["one"].pool)
    (status, body), (_, again), state = run(clusters, scenario)
    seen = json.loads(body)
    assert status == 200 and seen["method"] == "POST" and seen["target"] == "/api/v1/echo?x=1"
    assert seen["body"] == '{"a":1}' and ["Content-Length", "7"] in seen["headers"]
    assert ["Authorization", "Bearer gateway-credential-for-upstream"] in seen["headers"]
    assert not [h for h in seen["headers"] if h[0].lower().startswith("impersonate-")]
    assert json.loads(again)["conn"] == seen["conn"]  # the same pooled connection
    assert state == (1, 1)  # one connection, idle in the pool


def test_chunked_and_close_delimited_bodies_are_collected(clusters):
    async def scenario(up):
        return (await request(up["one"], "GET", "/watch?count=3&interval=0&size=5"),
                await request(up["one"], "GET", "/nolength"))
    (status, events), (_, until_close) = run(clusters, scenario)
    assert status == 200 and [json.loads(line)["object"]["n"] for line in events.splitlines()] == [0, 1, 2]
    assert until_close == b"until the end"


@pytest.mark.parametrize("cluster,path,kwargs,code,message", [
    ("down", "/api", {}, 503, 'cluster "down" is unreachable'),
    ("one", "/slow?delay=2", {"timeout": 0.3}, 504, 'cluster "one" did not answer in time'),
    ("one", "/big?size=100000", {"limit": 1000}, 502, "larger than 1000 bytes"),
])
def test_failures_raise_with_the_status_to_answer(clusters, cluster, path, kwargs, code, message):
    async def scenario(up):
        with pytest.raises(UpstreamRequestError) as caught:
            await request(up[cluster], "GET", path, **kwargs)
        await asyncio.sleep(0.05)  # let the aborted connection report its loss
        return caught.value, pool_state(up[cluster].pool)
    error, state = run(clusters, scenario)
    assert error.code == code and message in error.message
    assert state == (0, 0)  # nothing half-read goes back to the pool


def test_a_stale_pooled_connection_is_retried_once(clusters):
    async def closes_seen(up):
        _, body = await request(up["one"], "GET", "/stats")
        return json.loads(body)["hits"].get("close", 0)

    async def scenario(up):
        await request(up["one"], "GET", "/echo")  # a pooled connection for /close to be sent on
        before = await closes_seen(up)
        with pytest.raises(UpstreamRequestError) as caught:
            await request(up["one"], "GET", "/close")
        return caught.value, await closes_seen(up) - before
    error, attempts = run(clusters, scenario)
    assert "closed the connection before answering" in error.message
    assert attempts == 2  # on the pooled connection, then once on a fresh one


def test_cancelling_the_caller_releases_the_connection(clusters):
    async def scenario(up):
        task = asyncio.ensure_future(request(up["one"], "GET", "/slow?delay=2"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        return pool_state(up["one"].pool)
    assert run(clusters, scenario) == (0, 0)


@pytest.mark.parametrize("path,headers,message", [
    ("/echo", [("X-A", "b\r\nImpersonate-User: root")], "contains CR, LF or NUL"),
    ("/echo HTTP/1.1\r\nX: y", [], "contains CR, LF or NUL"),
    ("/echo", [("Content-Length", "0")], "'Content-Length' is set by request() itself"),
    ("/echo", [("authorization", "Bearer x")], "'authorization' is set by request() itself"),
])
def test_ambiguous_requests_are_refused_before_sending(clusters, path, headers, message):
    async def scenario(up):
        with pytest.raises(ValueError, match=re.escape(message)):
            await request(up["one"], "GET", path, headers=headers)
        return pool_state(up["one"].pool)
    assert run(clusters, scenario) == (0, 0)
