"""A cluster that breaks HTTP, through the real gateway process: a response the gateway cannot
trust is a 502 before it starts and a cut-off connection after; a pipelined batch keeps its order
around the refusals in its middle."""
from __future__ import annotations

from urllib.parse import quote

import pytest

from tests import test_proxy
from tests.rawhttp import Client
from tests.test_proxy import AUTH, BASE, upstream_stats

client = test_proxy.client  # the fixture: one TLS connection to the session's gateway

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def raw(send: bytes, then: bytes | None = None, pause: float = 0) -> str:
    """A path on which the test upstream answers exactly `send` (then `then`, after `pause`)."""
    target = f"{BASE}/raw?send={quote(send)}"
    return target if then is None else f"{target}&pause={pause}&then={quote(then)}"


@pytest.mark.parametrize("send,message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}", "sent an invalid response: invalid response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
     "data after the end of the response"),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
     "unexpected protocol switch"),
    (b"HTTP/1.1 000 OK\r\nContent-Length: 0\r\n\r\n", "status code 000 is not an HTTP status"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "closed the connection in the middle of its response head"),
], ids=["malformed head", "data after the end", "unexpected 101", "status 000", "head cut short"])
def test_a_broken_response_is_a_502_naming_the_cause_and_the_client_goes_on(client, send, message):
    client.request("GET", raw(send), AUTH)
    response = client.response()
    assert response.status == 502 and message in response.json()["message"], response.body
    client.request("GET", f"{BASE}/echo", AUTH)  # the client's connection is still good
    assert client.response().status == 200


def test_empty_lines_before_a_head_are_skipped_as_the_parser_skips_them(client):
    client.request("GET", raw(b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Kept: yes\r\n\r\n{}"), AUTH)
    response = client.response()
    assert (response.status, response.header("X-Kept"), response.body) == (200, "yes", b"{}")


def test_a_broken_body_after_the_head_cuts_the_client_off(client):
    # The head and a first chunk are relayed at once; the bad chunk size comes a second later.
    client.request("GET", raw(CHUNKED_HEAD + b"5\r\nhello\r\n", then=b"zz\r\n", pause=1), AUTH)
    response = client.head()
    assert response.status == 200
    assert client.closed_by_peer() and not response.complete  # truncated, never a clean end
    assert b"".join(response.chunks) == b"hello"


def test_a_pipelined_batch_keeps_its_order_around_502_504_and_ends_at_413(gateway, tls_files, client):
    stats = Client(gateway.port, tls_files["ca"])
    echoes = upstream_stats(stats)["hits"].get("echo", 0)
    batch = [f"GET {BASE}/echo?n=0", f"GET {BASE}/close", f"GET {BASE}/slow?delay=6", f"GET {BASE}/echo?n=3"]
    head = "HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer " + AUTH["Authorization"].split()[1] + "\r\n"
    data = "".join(f"{line} {head}\r\n" for line in batch)
    data += f"POST {BASE}/echo?n=4 {head}Content-Length: 200000000\r\n\r\n"  # past max_body_bytes: 413, close
    data += f"GET {BASE}/echo?n=5 {head}\r\n"
    client.send(data.encode())
    answers = [client.response() for _ in range(5)]
    assert [r.status for r in answers] == [200, 502, 504, 200, 413]
    assert [r.json()["target"] for r in answers if r.status == 200] == ["/echo?n=0", "/echo?n=3"]
    assert client.closed_by_peer()
    assert upstream_stats(stats)["hits"]["echo"] - echoes == 2  # n=4 refused, n=5 never read
    stats.close()
