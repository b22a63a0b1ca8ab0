"""Limits per identity and per cluster, and the connection cap per worker ([limits]): the decisions
alone, then through the real gateway process with real TLS clients."""
from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time

import pytest

from fastproxy.config import ConfigError, parse_config
from fastproxy.limits import (
    CLUSTER_REQUESTS,
    IDENTITY_REQUESTS,
    IDENTITY_TUNNELS,
    IDENTITY_WATCHES,
    Kind,
    LimitsConfig,
    limit_reached,
    parse_limits_config,
    refusal,
)
from tests.helpers import ACCESS_KEY, start_gateway
from tests.rawhttp import Client
from tests.test_proxy import BASE

BOB_KEY = "bob-access-key-9876543210"
ALICE = {"Authorization": f"Bearer {ACCESS_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}

# --- the decisions ---------------------------------------------------------------------------


def test_each_kind_meets_its_own_limit():
    config = LimitsConfig(requests_per_identity=2, requests_per_cluster=3, watches_per_identity=1,
                          tunnels_per_identity=1)
    assert limit_reached(config, Kind.REQUEST, 1, 2) is None
    assert limit_reached(config, Kind.REQUEST, 2, 0) == IDENTITY_REQUESTS
    assert limit_reached(config, Kind.REQUEST, 0, 3) == CLUSTER_REQUESTS
    assert limit_reached(config, Kind.WATCH, 0, 99) is None  # watches do not count against the cluster
    assert limit_reached(config, Kind.WATCH, 1, 0) == IDENTITY_WATCHES
    assert limit_reached(config, Kind.TUNNEL, 0, 0) is None
    assert limit_reached(config, Kind.TUNNEL, 1, 0) == IDENTITY_TUNNELS


def test_a_limit_of_zero_is_no_limit():
    config = LimitsConfig(watches_per_identity=1)
    assert limit_reached(config, Kind.REQUEST, 10**6, 10**6) is None
    assert limit_reached(config, Kind.TUNNEL, 10**6, 0) is None


def test_the_refusal_is_a_429_status_with_retry_after_naming_the_limit():
    err = refusal(LimitsConfig(requests_per_identity=5, retry_after=3), IDENTITY_REQUESTS)
    assert err.code == 429 and err.reason == "TooManyRequests"
    assert err.message == "too many requests in flight (limits.requests_per_identity = 5); retry after 3s"
    assert err.details == {"retryAfterSeconds": 3}
    assert err.headers == b"Retry-After: 3\r\n"


def test_the_table_is_checked_key_by_key():
    assert parse_limits_config({}) is None  # no limit set: the feature is off
    assert parse_limits_config({"retry_after": 5}) is None
    assert parse_limits_config({"watches_per_identity": 10}) == LimitsConfig(watches_per_identity=10)
    for table, message in (({"requests_per_identity": -1}, "limits.requests_per_identity: must be >= 0, not -1"),
                           ({"retry_after": 0}, "limits.retry_after: must be > 0, not 0"),
                           ({"tunnels_per_identity": "2"}, "limits.tunnels_per_identity: must be an integer, not '2'"),
                           ({"per_user": 1}, "limits.per_user: unknown key")):
        with pytest.raises(ConfigError) as caught:
            parse_limits_config(table)
        assert str(caught.value) == message
    config = parse_config({"limits": {"connections_per_worker": 100}})
    assert config.limits == LimitsConfig(connections_per_worker=100)


# --- through the gateway ---------------------------------------------------------------------


def limited_gateway(gateway_config, folder, limits: dict, response_header_timeout: int = 3):
    """The session's gateway with a second identity (bob, an admin who may scrape) and `limits`."""
    source, text = gateway_config
    text = text.replace("response_header_timeout = 3\n", f"response_header_timeout = {response_header_timeout}\n")
    for name in ("token", "key"):
        (folder / name).write_text((source / name).read_text())
    (folder / "bob-key").write_text(BOB_KEY + "\n")
    settings = "".join(f"        {key} = {value}\n" for key, value in limits.items())
    text += f"""
        [[access_keys]]
        name = "bob-key"
        key_file = "bob-key"
        user = "bob"
        groups = ["loft:admins"]

        [limits]
{settings}    """
    return start_gateway(text, folder)


@pytest.fixture(scope="module")
def limited(gateway_config, tmp_path_factory):
    process = limited_gateway(gateway_config, tmp_path_factory.mktemp("limits"),
                              {"requests_per_identity": 2, "requests_per_cluster": 3, "watches_per_identity": 1,
                               "tunnels_per_identity": 1, "retry_after": 2})
    yield process
    process.stop()


def open_client(process, tls_files) -> Client:
    return Client(process.port, tls_files["ca"], timeout=20)


def refused_429(response, key: str, limit: int) -> None:
    assert response.status == 429, response.body
    assert response.header("Retry-After") == "2"
    status = response.json()
    assert status["kind"] == "Status" and status["reason"] == "TooManyRequests"
    assert status["details"] == {"retryAfterSeconds": 2}
    assert f"(limits.{key} = {limit})" in status["message"] and "alice" not in status["message"]


def limited_counts(process, tls_files) -> dict[str, float]:
    conn = open_client(process, tls_files)
    conn.request("GET", "/metrics", BOB)
    response = conn.response()
    conn.close()
    assert response.status == 200, response.body
    return {m[0]: float(m[1]) for m in re.findall(r'^fastproxy_limited_requests_total\{limit="(\w+)"\} (\S+)$',
                                                  response.body.decode(), re.M)}


def test_requests_past_the_identitys_limit_get_429_while_others_are_served(limited, tls_files):
    before = limited_counts(limited, tls_files)
    slow = [open_client(limited, tls_files) for _ in range(2)]
    for conn in slow:
        conn.request("GET", f"{BASE}/slow?delay=2", ALICE)
    time.sleep(0.5)  # both in flight at the cluster
    third = open_client(limited, tls_files)
    third.request("GET", f"{BASE}/echo", ALICE)
    refused_429(third.response(), "requests_per_identity", 2)
    other = open_client(limited, tls_files)
    other.request("GET", f"{BASE}/echo", BOB)
    assert other.response().status == 200  # bob's own count; the cluster holds 3 at most, 2 + 1
    for conn in slow:
        assert conn.response().status == 200
    third.request("GET", f"{BASE}/echo", ALICE)  # the slow ones gave their places back
    assert third.response().status == 200
    after = limited_counts(limited, tls_files)
    assert after[IDENTITY_REQUESTS] == before[IDENTITY_REQUESTS] + 1
    assert set(after) == {IDENTITY_REQUESTS, CLUSTER_REQUESTS, IDENTITY_WATCHES, IDENTITY_TUNNELS}
    for conn in (*slow, third, other):
        conn.close()


def test_the_clusters_limit_counts_every_identity(limited, tls_files):
    held = [open_client(limited, tls_files) for _ in range(3)]
    for conn, who in zip(held, (ALICE, ALICE, BOB)):
        conn.request("GET", f"{BASE}/slow?delay=2", who)
    time.sleep(0.5)
    fourth = open_client(limited, tls_files)
    fourth.request("GET", f"{BASE}/echo", BOB)  # bob holds 1 of his 2, but the cluster holds 3 of 3
    response = fourth.response()
    assert response.status == 429 and "(limits.requests_per_cluster = 3)" in response.json()["message"]
    for conn in held:
        assert conn.response().status == 200
    for conn in (*held, fourth):
        conn.close()


def test_a_second_watch_and_a_second_tunnel_are_refused_until_the_first_ends(limited, tls_files):
    watch = open_client(limited, tls_files)
    watch.request("GET", f"{BASE}/api/v1/pods?watch=1&serve=watch&interval=0.2", ALICE)
    assert watch.head().status == 200
    second = open_client(limited, tls_files)
    second.request("GET", f"{BASE}/api/v1/pods?watch=true&serve=watch", ALICE)
    refused_429(second.response(), "watches_per_identity", 1)
    second.request("GET", f"{BASE}/echo", ALICE)  # a watch does not count as a request
    assert second.response().status == 200
    tunnel = open_client(limited, tls_files)
    upgrade = {**ALICE, "Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
    tunnel.request("POST", f"{BASE}/upgrade", upgrade)
    assert tunnel.read_some().startswith(b"HTTP/1.1 101 ")
    refused = open_client(limited, tls_files)
    refused.request("POST", f"{BASE}/upgrade", upgrade)
    refused_429(refused.response(), "tunnels_per_identity", 1)
    watch.close()
    tunnel.close()
    deadline = time.monotonic() + 10
    while True:  # the gateway sees both ends and gives the places back
        again = open_client(limited, tls_files)
        again.request("GET", f"{BASE}/api/v1/pods?watch=1&serve=watch", ALICE)
        if again.head().status == 200:
            again.close()
            break
        again.close()
        assert time.monotonic() < deadline, "the ended watch kept its place"
        time.sleep(0.1)
    refused.close()
    second.close()


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(len(ordered) * 0.99) - 1]


async def timed_gets(port: int, context: ssl.SSLContext, count: int) -> list[float]:
    """`count` GETs one after another on one keep-alive connection as bob: each one's latency."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    request = f"GET {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {BOB_KEY}\r\n\r\n".encode()
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - began)
    writer.close()
    return latencies


async def hold_slow(port: int, context: ssl.SSLContext, statuses: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    writer.write(f"GET {BASE}/slow?delay=30 HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    statuses.append(int(head[9:12]))
    await reader.read()  # a 429 closes nothing: hold the connection until the test drops it


def test_one_identity_holding_1000_slow_requests_does_not_slow_another(gateway_config, tls_files, tmp_path):
    process = limited_gateway(gateway_config, tmp_path, {"requests_per_identity": 50}, response_header_timeout=60)
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))

    async def scenario() -> tuple[float, float, list[int]]:
        await timed_gets(process.port, context, 50)  # warm: the pooled connection, the caches
        unloaded = p99(await timed_gets(process.port, context, 300))
        statuses: list[int] = []
        holders = []
        for _ in range(10):  # 1,000 connections, 100 at a time
            holders += [asyncio.ensure_future(hold_slow(process.port, context, statuses)) for _ in range(100)]
            while len(statuses) < len(holders) - 50:  # each refused at once, or admitted and waiting
                await asyncio.sleep(0.05)
        began = time.monotonic()
        while len(statuses) < 950:
            assert time.monotonic() - began < 30, f"{len(statuses)} answered"
            await asyncio.sleep(0.05)
        loaded = p99(await timed_gets(process.port, context, 300))
        assert len(statuses) == 950  # the admitted 50 still wait for the cluster
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        return unloaded, loaded, statuses
    try:
        unloaded, loaded, statuses = asyncio.run(scenario())
    finally:
        process.stop()
    assert statuses.count(429) == 950
    # Generous bounds: a shared machine's jitter is milliseconds, a starved request's seconds.
    print(f"bob's p99: {unloaded * 1000:.2f} ms unloaded, {loaded * 1000:.2f} ms while alice holds 1,000")
    assert loaded <= 2 * max(unloaded, 0.005), (unloaded, loaded)


# --- the connection cap ----------------------------------------------------------------------


def tls_handshake_done(port: int, ca, timeout: float) -> ssl.SSLSocket | None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="127.0.0.1")
    except (TimeoutError, ssl.SSLError, OSError):
        raw.close()
        return None


def test_past_the_connection_cap_accepting_waits_until_a_connection_leaves(gateway_config, tls_files, tmp_path):
    process = limited_gateway(gateway_config, tmp_path, {"connections_per_worker": 3})
    try:
        held = [open_client(process, tls_files) for _ in range(3)]
        for conn in held:
            conn.request("GET", f"{BASE}/echo", ALICE)
            assert conn.response().status == 200  # kept alive: each holds its place
        raw = socket.create_connection(("127.0.0.1", process.port), timeout=10)  # in the backlog, not accepted
        waiting = ssl.create_default_context(cafile=str(tls_files["ca"])).wrap_socket(
            raw, server_hostname="127.0.0.1", do_handshake_on_connect=False)
        waiting.settimeout(1.5)
        with pytest.raises(TimeoutError):
            waiting.do_handshake()  # nobody answers the ClientHello while three connections are open
        held.pop().close()
        waiting.settimeout(10)
        waiting.do_handshake()  # accepted once one left, without a reconnect
        waiting.sendall(f"GET {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n".encode())
        assert waiting.recv(12) == b"HTTP/1.1 200"
        waiting.close()
        for conn in held:
            conn.close()
        assert "cannot accept" not in process.log.read_text()
    finally:
        process.stop()


def test_plain_http_past_the_connection_cap_waits_as_well(gateway_config, tls_files, tmp_path):
    source, text = gateway_config
    plain = (source, re.sub(r"        tls_(cert|key)_file = .*\n", "", text))
    process = limited_gateway(plain, tmp_path, {"connections_per_worker": 2})
    request = f"GET {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n".encode()
    try:
        held = [Client(process.port, timeout=10) for _ in range(2)]
        for conn in held:
            conn.send(request)
            assert conn.response().status == 200
        waiting = socket.create_connection(("127.0.0.1", process.port), timeout=1.5)
        waiting.sendall(request)  # taken by the kernel's backlog
        with pytest.raises(TimeoutError):
            waiting.recv(12)
        held.pop().close()
        waiting.settimeout(10)
        assert waiting.recv(12) == b"HTTP/1.1 200"
        waiting.close()
        held[0].close()
    finally:
        process.stop()


def test_shared_watches_and_per_request_limits_go_together():
    """Each subscriber of a shared stream counts as a watch (tests/e2e/test_shared_watches.py)."""
    config = parse_config({"server": {"share_watches": True}, "limits": {"watches_per_identity": 2}})
    assert config.server.share_watches and config.limits is not None and config.limits.watches_per_identity == 2
