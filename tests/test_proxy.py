"""The gateway between a real TLS client socket and a real TLS upstream process."""
from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import threading
import time

import pytest

from tests.helpers import ACCESS_KEY, start_gateway
from tests.rawhttp import Client

AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}
BASE = "/kubernetes/cluster/one"


@pytest.fixture
def client(gateway, tls_files):
    c = Client(gateway.port, tls_files["ca"])
    yield c
    c.close()


def seen(response):
    assert response.status == 200, response.body
    return response.json()


def upstream_stats(client):
    client.request("GET", f"{BASE}/stats", AUTH)
    return client.response().json()


def test_impersonation_as_the_upstream_sees_it(client):
    client.request("GET", f"{BASE}/api/v1/echo?labelSelector=app%3Dweb&limit=5",
                   {**AUTH, "Accept": "application/json", "X-Forwarded-For": "10.9.8.7",
                    "Connection": "Impersonate-User, Impersonate-Group, Authorization, X-Drop", "X-Drop": "1"})
    got = seen(client.response())
    assert got["target"] == "/api/v1/echo?labelSelector=app%3Dweb&limit=5"
    headers = got["headers"]
    assert ["Authorization", "Bearer gateway-credential-for-upstream"] in headers
    assert ["Impersonate-User", "alice"] in headers
    assert [h for h in headers if h[0] == "Impersonate-Group"] == [["Impersonate-Group", "dev"], ["Impersonate-Group", "ops"]]
    assert ["X-Forwarded-For", "10.9.8.7, 127.0.0.1"] in headers
    assert ["Accept", "application/json"] in headers
    names = [h[0].lower() for h in headers]
    assert "x-drop" not in names and "connection" not in names
    assert names.count("authorization") == 1 and names.count("impersonate-user") == 1


@pytest.mark.parametrize("headers,message", [
    ({}, "a bearer access key is required"),
    ({"Authorization": "Bearer not-the-key"}, "invalid access key"),
    ({"Authorization": f"Basic {ACCESS_KEY}"}, "must be 'Bearer <access key>'"),
])
def test_401_without_a_valid_key(client, headers, message):
    client.request("GET", f"{BASE}/api/v1/echo", headers)
    response = client.response()
    assert response.status == 401 and response.json()["code"] == 401 and message in response.json()["message"]
    assert response.keep_alive  # a refusal is still a complete exchange on a live connection


def test_keep_alive_reuses_client_and_upstream_connections(client, gateway, tls_files):
    client.request("GET", f"{BASE}/echo", AUTH)
    first = seen(client.response())
    client.request("GET", f"{BASE}/echo", AUTH)
    assert seen(client.response())["conn"] == first["conn"]
    other = Client(gateway.port, tls_files["ca"])
    other.request("GET", f"{BASE}/echo", AUTH)
    assert seen(other.response())["conn"] == first["conn"]  # the pool serves every client
    other.close()


def test_new_upstream_connections_resume_the_tls_session(client, gateway, tls_files):
    client.request("GET", f"{BASE}/echo", AUTH)
    first = seen(client.response())
    # Hold every pooled connection with a watch, so the next request needs a new one.
    watchers = []
    for _ in range(3):
        watcher = Client(gateway.port, tls_files["ca"])
        watcher.request("GET", f"{BASE}/api/v1/watch?watch=1&interval=0.2&count=20", AUTH)
        assert watcher.head().status == 200
        watchers.append(watcher)
    other = Client(gateway.port, tls_files["ca"])
    other.request("GET", f"{BASE}/echo", AUTH)
    fresh = seen(other.response())
    assert fresh["conn"] != first["conn"] and fresh["tls_resumed"] is True
    for c in (*watchers, other):
        c.close()


def test_pipelined_requests_are_answered_in_order(client):
    batch = b"".join(
        f"GET {BASE}/echo?n={n} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n".encode()
        for n in range(3))
    batch += f"GET {BASE}/echo?n=3 HTTP/1.1\r\nHost: g\r\n\r\n".encode()  # refused, but in its turn
    batch += f"GET {BASE}/echo?n=4 HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n".encode()
    client.send(batch)
    answers = [client.response() for _ in range(5)]
    assert [r.status for r in answers] == [200, 200, 200, 401, 200]
    assert [r.json()["target"] for r in answers if r.status == 200] == [f"/echo?n={n}" for n in (0, 1, 2, 4)]


def test_watch_events_arrive_one_by_one(client):
    client.request("GET", f"{BASE}/api/v1/watch?watch=1&count=3&interval=1", AUTH)
    response = client.head()
    assert response.status == 200 and response.header("Transfer-Encoding") == "chunked"
    arrivals = []
    while len(arrivals) < 3:
        client.feed_until(lambda: len(response.chunks) > len(arrivals), "an event")
        arrivals.append(time.time())
        assert json.loads(response.chunks[len(arrivals) - 1])["object"]["n"] == len(arrivals) - 1
    client.feed_until(lambda: response.complete, "the end of the stream")
    # Each event reached the client before the upstream even sent the next: relayed, not buffered.
    sent = [json.loads(chunk)["object"]["sent"] for chunk in response.chunks]
    assert all(arrived < sent_next for arrived, sent_next in zip(arrivals, sent[1:])), (arrivals, sent)


def test_client_disconnect_closes_the_upstream_watch(gateway, tls_files, client):
    tag = f"left-{time.monotonic_ns()}"  # this watch's own mark: other watches end on their own
    watcher = Client(gateway.port, tls_files["ca"])
    watcher.request("GET", f"{BASE}/api/v1/watch?watch=true&interval=0.05&tag={tag}", AUTH)
    assert watcher.head().status == 200
    assert tag not in upstream_stats(client)["ended"]
    watcher.close()
    deadline = time.time() + 10
    while tag not in upstream_stats(client)["ended"]:
        assert time.time() < deadline, "the upstream watch was not closed after the client left"
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_client_that_stops_reading_keeps_memory_bounded(gateway, tls_files):
    stalled = Client(gateway.port, tls_files["ca"])
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    before = rss_kib(gateway.popen.pid)
    size = 100_000_000
    stalled.request("GET", f"{BASE}/big?size={size}&chunked=1", AUTH)
    time.sleep(2.0)  # the upstream could send all 100 MB in this time; the gateway must not take it
    grown = rss_kib(gateway.popen.pid) - before
    assert grown < 20 * 1024, f"gateway RSS grew by {grown} KiB for one stalled client"
    # Once the client reads again the whole stream arrives, byte for byte (hashed as it comes).
    response = stalled.head()
    assert response.status == 200
    digest, received = hashlib.sha256(), 0

    def take_chunks():
        nonlocal received
        for chunk in response.chunks:
            digest.update(chunk)
            received += len(chunk)
        response.chunks.clear()
        response.body = b""
        return response.complete
    stalled.sock.settimeout(30)
    stalled.feed_until(take_chunks, "the end of the stream")
    assert received == size and digest.digest() == big_body_digest(size)
    stalled.close()


def big_body(size: int) -> bytes:
    """What the test upstream's /big sends."""
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def big_body_digest(size: int) -> bytes:
    digest, block = hashlib.sha256(), b"0123456789abcdef" * 4096
    for start in range(0, size, len(block)):
        digest.update(block[:size - start])
    return digest.digest()


def test_large_response_is_relayed_intact(client):
    client.request("GET", f"{BASE}/big?size=5000000", AUTH)
    response = client.response()
    assert response.status == 200 and response.body == big_body(5000000)


def test_request_bodies_stream_upstream(client):
    body = b"".join(b"%08d" % n for n in range(37500))  # 300 kB, each piece in its place
    client.request("PUT", f"{BASE}/echo", AUTH, body)
    got = seen(client.response())
    assert got["method"] == "PUT" and got["framing"] == "length" and got["body"].encode("latin-1") == body


def test_chunked_request_body_is_reframed(client):
    client.send(f"POST {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".encode())
    got = seen(client.response())
    assert (got["framing"], got["body"]) == ("chunked", "hello world")
    assert ["Transfer-Encoding", "chunked"] in got["headers"]


def test_expect_continue_is_answered_by_the_gateway(client):
    client.send(f"POST {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n"
                "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n".encode())
    assert client.read_some().startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.send(b"data")
    got = seen(client.response())
    assert got["body"] == "data" and "expect" not in [h[0].lower() for h in got["headers"]]


def test_upstream_hop_by_hop_response_headers_are_dropped(client):
    client.request("GET", f"{BASE}/hopbyhop", AUTH)
    response = client.response()
    names = [n.lower() for n, _ in response.headers]
    assert response.header("X-Kept") == "yes"
    assert "x-secret" not in names and "keep-alive" not in names and "connection" not in names


def test_head_request_then_keep_alive(client):
    client.request("HEAD", f"{BASE}/echo", AUTH)
    client.request("GET", f"{BASE}/echo?after-head", AUTH)
    data = b""
    while b"after-head" not in data:
        data += client.read_some()
    first, rest = data.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200 OK") and b"Content-Length:" in first
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body bytes between the two responses


def test_unframed_response_ends_with_the_connection(client):
    client.request("GET", f"{BASE}/nolength", AUTH)
    response = client.head()
    assert response.status == 200
    assert client.closed_by_peer()
    assert response.body == b"until the end"


def test_http_1_0_request(client):
    client.send(f"GET {BASE}/echo HTTP/1.0\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n".encode())
    got = seen(client.response())
    assert got["version"] == "HTTP/1.0"
    assert client.closed_by_peer()


@pytest.mark.parametrize("path,code", [
    (f"{BASE}/../down/api", 400),
    (f"{BASE}/%2e%2e/down/api", 400),
    ("/kubernetes/cluster/one%2f..%2fdown/api", 400),
    ("/kubernetes/cluster/nowhere/api", 404),
    ("/kubernetes/management/apis/management.loft.sh/v1/users", 403),  # the gateway's own API: not an admin
])
def test_paths_that_must_not_reach_any_cluster(client, path, code):
    client.request("GET", path, AUTH)
    response = client.response()
    assert response.status == code and response.json()["kind"] == "Status"


def test_normalised_path_is_what_the_upstream_gets(client):
    client.request("GET", f"{BASE}//api/./v1//echo?x=%2F..", AUTH)
    assert seen(client.response())["target"] == "/api/v1/echo?x=%2F.."


def test_upstream_down_is_503_naming_the_cluster(client):
    client.request("GET", "/kubernetes/cluster/down/api", AUTH)
    response = client.response()
    assert response.status == 503 and 'cluster "down" is unreachable' in response.json()["message"]


def test_a_cluster_that_never_finishes_tls_is_503_after_connect_timeout(gateway_config, tls_files):
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes TCP; nobody speaks TLS
    folder, text = gateway_config
    text = text.replace('server = "https://127.0.0.1:1"', f'server = "https://127.0.0.1:{silent.getsockname()[1]}"\n'
                        '        connect_timeout = 0.5')
    gateway = start_gateway(text, folder)
    try:
        client = Client(gateway.port, tls_files["ca"])
        started = time.monotonic()
        client.request("GET", "/kubernetes/cluster/down/api", AUTH)
        response = client.response()
        assert response.status == 503
        assert response.json()["message"] == 'cluster "down" is unreachable: timed out connecting'
        assert 0.4 < time.monotonic() - started < 3
        waiting, _ = silent.accept()
        waiting.settimeout(5)
        assert waiting.recv(65536).startswith(b"\x16\x03")  # the gateway's ClientHello...
        assert waiting.recv(65536) == b""  # ...then it gave up and closed the socket
        waiting.close()
        client.close()
    finally:
        gateway.stop()
        silent.close()


def test_upstream_timeout_is_504(client):
    client.request("GET", f"{BASE}/slow?delay=6", AUTH)
    started = time.time()
    response = client.response()
    assert response.status == 504 and response.json()["reason"] == "Timeout"
    assert 2.5 < time.time() - started < 5


def test_dead_pooled_connection_is_retried_once(client):
    client.request("GET", f"{BASE}/echo", AUTH)  # make sure a pooled connection exists
    seen(client.response())
    before = upstream_stats(client)["hits"].get("close", 0)
    client.request("GET", f"{BASE}/close", AUTH)
    response = client.response()
    assert response.status == 502 and "closed the connection before answering" in response.json()["message"]
    # Sent on a reused connection, then once more on a fresh one; never a third time.
    assert upstream_stats(client)["hits"]["close"] - before == 2


def test_health_needs_no_key(client):
    client.request("GET", "/healthz")
    response = client.response()
    assert (response.status, response.body) == (200, b"ok")


def upgrade_request(path, protocol="SPDY/3.1"):
    return (f"POST {BASE}/{path} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n"
            f"Connection: Upgrade\r\nUpgrade: {protocol}\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
            "Content-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize("protocol", ["SPDY/3.1", "websocket"])
def test_upgrade_becomes_a_tunnel_both_ways(client, protocol):
    client.send(upgrade_request("api/v1/namespaces/a/pods/p/exec/upgrade", protocol))
    data = b""
    while b"hello from upstream\n" not in data:
        more = client.read_some()
        assert more, f"closed after {data!r}"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols")
    assert f"Upgrade: {protocol}".encode() in head and b"Connection: Upgrade" in head
    assert b"X-Stream-Protocol-Version: v4.channel.k8s.io" in head
    for word in (b"ping", b"x" * 200000):
        client.send(word)
        echoed = b""
        while len(echoed) < len(word):
            data = client.read_some()
            assert data, "tunnel closed"
            echoed += data
        assert echoed == word.upper()


def test_non_101_answer_to_an_upgrade_is_relayed_and_never_pooled(client, gateway, tls_files):
    client.send(upgrade_request("redirect"))
    response = client.response()
    assert response.status == 302 and response.header("Location") == "https://example.invalid/"
    assert client.closed_by_peer()  # the redirect is not followed, the tunnel never opens
    upgrade_conn = response.header("X-Conn")
    other = Client(gateway.port, tls_files["ca"])
    for _ in range(3):
        other.request("GET", f"{BASE}/echo", AUTH)
        assert str(seen(other.response())["conn"]) != upgrade_conn
    other.close()


def test_unsupported_upgrade_is_refused(client):
    client.send(upgrade_request("upgrade", "h2c"))
    response = client.response()
    assert response.status == 400 and "upgrades are supported" in response.json()["message"]


@pytest.mark.parametrize("raw", [
    b"POST /kubernetes/cluster/one/echo HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /kubernetes/cluster/one/echo HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET /kubernetes/cluster/one/echo HTTP/1.1\r\nHost: g\r\nX-A: b\r\n c\r\n\r\n",
    b"POST /kubernetes/cluster/one/echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST /kubernetes/cluster/one/echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /kubernetes/cluster/one/echo HTTP/1.1\nHost: g\n\n",
    b"GET /kubernetes/cluster/one/echo HTTP/1.1\r\nHost : g\r\n\r\n",
])
def test_smuggling_shapes_are_refused_and_closed(client, raw):
    client.send(raw.replace(b"Host: g\r\n", b"Host: g\r\nAuthorization: Bearer " + ACCESS_KEY.encode() + b"\r\n", 1))
    response = client.response()
    assert response.status == 400 and response.json()["reason"] == "BadRequest"
    assert client.closed_by_peer()


def test_oversized_head_is_431(client):
    client.request("GET", f"{BASE}/echo", {**AUTH, "X-Big": "a" * 70000})
    response = client.response()
    assert response.status == 431
    assert client.closed_by_peer()


def test_oversized_body_is_413(client):
    client.send(f"POST {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n"
                "Content-Length: 200000000\r\n\r\n".encode())
    response = client.response()
    assert response.status == 413 and response.json()["reason"] == "RequestEntityTooLarge"


def test_slow_headers_are_cut_off(client):
    client.send(b"GET /kubernetes/cluster/one/echo HTTP/1.1\r\nHost: g\r\n")
    started = time.time()
    response = client.response()
    assert response.status == 408
    assert 1.5 < time.time() - started < 4
    assert client.closed_by_peer()


def test_tls_offers_http_1_1(gateway, tls_files):
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", gateway.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"


def test_refused_upgrade_closes_the_connection(client):
    client.send(upgrade_request("upgrade").replace(f"Authorization: Bearer {ACCESS_KEY}\r\n".encode(), b""))
    response = client.response()
    assert response.status == 401 and not response.keep_alive
    assert client.closed_by_peer()  # the bytes after an upgrade request are not HTTP any more


@pytest.fixture(scope="module")
def plain_gateway(gateway_config, tmp_path_factory):
    folder, text = gateway_config
    plain = tmp_path_factory.mktemp("plain")
    for name in ("token", "key"):
        (plain / name).write_text((folder / name).read_text())
    text = "\n".join(line for line in text.splitlines() if "tls_cert_file" not in line and "tls_key_file" not in line)
    process = start_gateway(text, plain)
    yield process
    process.stop()


def test_half_closed_client_still_gets_its_answer(plain_gateway):
    conn = Client(plain_gateway.port)
    conn.request("GET", f"{BASE}/slow?delay=0.3", AUTH)
    conn.sock.shutdown(socket.SHUT_WR)
    response = conn.response()
    assert response.status == 200 and response.header("Connection") == "close"
    assert conn.closed_by_peer()
    conn.close()


def test_an_upstream_that_stops_reading_keeps_memory_bounded(gateway, tls_files):
    uploader = Client(gateway.port, tls_files["ca"], timeout=30)
    size, block = 64 * 1024 * 1024, b"u" * (1024 * 1024)
    uploader.send(f"PUT {BASE}/stall?delay=2 HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n"
                  f"Content-Length: {size}\r\n\r\n".encode())
    before = rss_kib(gateway.popen.pid)
    sender = threading.Thread(target=lambda: [uploader.sock.sendall(block) for _ in range(size // len(block))])
    sender.start()
    time.sleep(1.5)  # the upstream reads nothing yet; the gateway must stop reading the client
    grown = rss_kib(gateway.popen.pid) - before
    assert grown < 20 * 1024, f"gateway RSS grew by {grown} KiB while the upstream did not read"
    assert sender.is_alive()  # the client is held back, not buffered for
    response = uploader.response()
    sender.join()
    assert response.status == 200 and response.json() == {"received": size}
    uploader.close()


def test_sigterm_stops_accepting_closes_idle_clients_and_finishes_requests_in_flight(gateway_config, tls_files):
    folder, text = gateway_config
    gateway = start_gateway(text, folder)
    try:
        idle = Client(gateway.port, tls_files["ca"])
        idle.request("GET", f"{BASE}/api/v1/echo", AUTH)
        assert idle.response().status == 200
        busy = Client(gateway.port, tls_files["ca"])
        busy.request("GET", f"{BASE}/api/v1/slow?delay=1.5", AUTH)
        time.sleep(0.3)  # the request is with the upstream
        gateway.popen.send_signal(signal.SIGTERM)
        assert idle.closed_by_peer()  # within its 5 s socket timeout
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
        assert busy.response().status == 200  # finished, though it ends after the signal
        assert gateway.popen.wait(5) == 0
        idle.close()
        busy.close()
    finally:
        gateway.stop()


def test_plain_http_to_the_https_port_gets_a_readable_400(gateway):
    plain = Client(gateway.port)  # no TLS
    try:
        plain.request("GET", f"{BASE}/api/v1/echo", AUTH)
        response = plain.response()
        assert response.status == 400
        assert response.json()["message"] == "this port speaks HTTPS; the client sent plain HTTP"
        assert plain.closed_by_peer()
    finally:
        plain.close()


@pytest.mark.parametrize("trailer", [
    "Impersonate-Group: system:masters", "Impersonate-User: admin", "Authorization: Bearer other-key",
    "Content-Length: 5", "Transfer-Encoding: chunked", "Host: evil.example",
])
def test_chunked_trailers_never_reach_the_next_request(client, trailer):
    client.send((f"POST {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n"
                 f"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n{trailer}\r\n\r\n"
                 f"GET {BASE}/echo?second HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n\r\n").encode())
    first = client.response()
    name = trailer.split(":")[0].lower()
    if name in ("content-length", "transfer-encoding"):
        # Framing in a trailer is ambiguous HTTP: refused, and the connection ends.
        assert first.status == 400 and client.closed_by_peer()
        return
    assert first.status == 200 and first.json()["body"] == "hello"
    second = client.response()
    for got in (first.json(), seen(second)):
        names = [h[0].lower() for h in got["headers"]]
        assert names.count(name) == (2 if name == "impersonate-group" else name != "transfer-encoding")
        assert [h[1] for h in got["headers"] if h[0] == "Impersonate-Group"] == ["dev", "ops"]
        assert "evil.example" not in str(got["headers"])
        assert "system:masters" not in str(got["headers"]) and "other-key" not in str(got["headers"])
        assert [h for h in got["headers"] if h[0] == "Impersonate-User"] == [["Impersonate-User", "alice"]]
    assert second.json()["target"] == "/echo?second"


def test_the_httpoxy_proxy_header_is_not_forwarded(client):
    client.request("GET", f"{BASE}/echo", {**AUTH, "Proxy": "http://attacker.example:8080"})
    assert "attacker" not in str(seen(client.response())["headers"])


def test_gateway_answers_carry_a_date_and_health_is_not_cached(client):
    client.request("GET", "/healthz")
    health = client.response()
    client.request("GET", f"{BASE}/echo")
    refusal = client.response()
    for response in (health, refusal):
        date = response.header("Date")
        assert date is not None and date.endswith(" GMT")
        assert response.header("Cache-Control") == "no-store"
