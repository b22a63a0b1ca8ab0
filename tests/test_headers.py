import pytest

from fastproxy.auth.identity import identity_header_lines
from fastproxy.headers import (
    client_response_head,
    has_framing,
    relay_response_head,
    scan_client_headers,
    upstream_request_head,
)
from fastproxy.status import StatusError


def scan(*pairs):
    return scan_client_headers([(n.encode(), v.encode()) for n, v in pairs])


def test_end_to_end_headers_are_kept_and_gateway_owned_are_taken():
    found = scan(("Host", "gw"), ("Accept", "application/json"), ("Authorization", "Bearer k"),
                 ("Content-Length", "5"), ("User-Agent", "kubectl"), ("X-Forwarded-For", "10.0.0.1"))
    assert found.kept == [(b"Accept", b"application/json"), (b"User-Agent", b"kubectl")]
    assert found.authorization == b"Bearer k"
    assert found.content_length == 5
    assert found.forwarded_for == b"10.0.0.1"


@pytest.mark.parametrize("name", ["Impersonate-User", "impersonate-group", "Impersonate-Uid", "Impersonate-Extra-scopes"])
def test_client_impersonation_is_taken_out_never_kept(name):
    found = scan(("Authorization", "Bearer k"), (name, "system:admin"), ("Accept", "*/*"))
    assert found.kept == [(b"Accept", b"*/*")]
    assert found.impersonation == [(name.lower().encode(), b"system:admin")]


def test_no_impersonation_headers_means_none():
    assert scan(("Authorization", "Bearer k"), ("Accept", "*/*")).impersonation is None


def test_impersonation_named_in_connection_is_hop_by_hop():
    # Named in Connection, a header is for the gateway only: dropped before anything acts on it.
    found = scan(("Impersonate-User", "bob"), ("Impersonate-Group", "ops"), ("Connection", "Impersonate-User"))
    assert found.impersonation == [(b"impersonate-group", b"ops")]
    assert scan(("Impersonate-User", "bob"), ("Connection", "impersonate-user")).impersonation is None


@pytest.mark.parametrize("value,kept,token", [
    ("base64url.bearer.authorization.k8s.io.dG9rZW4, v5.channel.k8s.io", b"v5.channel.k8s.io", b"dG9rZW4"),
    ("v5.channel.k8s.io,base64url.bearer.authorization.k8s.io.dG9rZW4,v4.channel.k8s.io",
     b"v5.channel.k8s.io, v4.channel.k8s.io", b"dG9rZW4"),
    ("BASE64URL.Bearer.Authorization.K8S.io.dG9rZW4", None, b"dG9rZW4"),
    ("v5.channel.k8s.io", b"v5.channel.k8s.io", None),
])
def test_bearer_subprotocol_is_taken_out_and_the_others_kept(value, kept, token):
    found = scan(("Sec-WebSocket-Protocol", value), ("Accept", "*/*"))
    assert found.bearer_subprotocol == token
    expected = [(b"Sec-WebSocket-Protocol", kept)] if kept else []
    assert found.kept == [*expected, (b"Accept", b"*/*")]


def test_two_bearer_subprotocols_are_refused():
    with pytest.raises(StatusError) as err:
        scan(("Sec-WebSocket-Protocol", "base64url.bearer.authorization.k8s.io.YQ"),
             ("Sec-WebSocket-Protocol", "base64url.bearer.authorization.k8s.io.Yg"))
    assert err.value.code == 400 and "more than one bearer token subprotocol" in err.value.message


def test_hop_by_hop_and_connection_named_headers_are_dropped():
    found = scan(("Connection", "keep-alive, X-Private, Authorization"), ("Keep-Alive", "timeout=5"),
                 ("TE", "trailers"), ("Trailer", "X"), ("Proxy-Authorization", "Basic x"),
                 ("Proxy-Connection", "keep-alive"), ("X-Private", "1"), ("X-Public", "2"),
                 ("Upgrade", "websocket"), ("Authorization", "Bearer k"))
    assert found.kept == [(b"X-Public", b"2")]
    assert found.upgrade == b"websocket"


def test_connection_naming_impersonate_user_cannot_remove_the_gateways_own():
    # The CVE-2021-31999 shape: the client names the gateway's headers in Connection.
    found = scan(("Connection", "Impersonate-User, Impersonate-Group, Authorization"), ("Authorization", "Bearer k"))
    head = upstream_request_head(
        b"GET", b"/api", b"1.1", found.kept, host=b"Host: up\r\n", credential=b"Authorization: Bearer gw\r\n",
        impersonation=identity_header_lines("alice", ("dev",)), forwarded_for=b"1.2.3.4", framing=b"", upgrade=None)
    assert b"Impersonate-User: alice\r\n" in head
    assert b"Impersonate-Group: dev\r\n" in head
    assert b"Authorization: Bearer gw\r\n" in head
    assert b"Bearer k" not in head and b"Connection" not in head


@pytest.mark.parametrize("pairs,code", [
    ((("Transfer-Encoding", "gzip, chunked"),), 400),
    ((("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")), 400),
    ((("Transfer-Encoding", "identity"),), 400),
    ((("Host", "a"), ("Host", "b")), 400),
    ((("Authorization", "Bearer a"), ("Authorization", "Bearer b")), 400),
    ((("Expect", "something-else"),), 417),
])
def test_ambiguous_requests_are_refused_and_close(pairs, code):
    with pytest.raises(StatusError) as err:
        scan(*pairs)
    assert err.value.code == code and err.value.close


def test_chunked_and_expect_continue_are_recognised():
    found = scan(("Transfer-Encoding", " Chunked "), ("Expect", "100-Continue"))
    assert found.chunked and found.expect_continue and found.kept == []


def test_upstream_head_layout():
    head = upstream_request_head(
        b"POST", b"/api/v1/namespaces/a/pods?dryRun=All", b"1.1", [(b"Accept", b"*/*")],
        host=b"Host: 10.0.0.1:6443\r\n", credential=b"Authorization: Bearer gw\r\n",
        impersonation=b"Impersonate-User: bob\r\n", forwarded_for=b"10.1.1.1, 127.0.0.1",
        framing=b"Content-Length: 12\r\n", upgrade=None)
    assert head == (b"POST /api/v1/namespaces/a/pods?dryRun=All HTTP/1.1\r\nHost: 10.0.0.1:6443\r\nAccept: */*\r\n"
                    b"Authorization: Bearer gw\r\nImpersonate-User: bob\r\nX-Forwarded-For: 10.1.1.1, 127.0.0.1\r\n"
                    b"Content-Length: 12\r\n\r\n")


def test_upgrade_head_carries_upgrade_headers():
    head = upstream_request_head(b"GET", b"/x", b"1.1", [], host=b"Host: h\r\n", credential=b"", impersonation=b"",
                                 forwarded_for=b"1.1.1.1", framing=b"", upgrade=b"websocket")
    assert head.endswith(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")


def test_response_head_drops_hop_by_hop_keeps_framing():
    head = client_response_head(200, [(b"Content-Type", b"application/json"), (b"Transfer-Encoding", b"chunked"),
                                      (b"Connection", b"keep-alive, X-Internal"), (b"X-Internal", b"1"),
                                      (b"Keep-Alive", b"timeout=5")], keep_alive=True)
    assert head == b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_response_head_close_and_upgrade():
    assert client_response_head(404, [], keep_alive=False) == b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n"
    head = client_response_head(101, [(b"Upgrade", b"SPDY/3.1"), (b"Connection", b"Upgrade"),
                                      (b"X-Stream-Protocol-Version", b"v4.channel.k8s.io")], keep_alive=False, upgrade=True)
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n"
                    b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\nConnection: Upgrade\r\n\r\n")


@pytest.mark.parametrize("user,groups", [("a\r\nImpersonate-User: root", ()), ("a", ("g\n",)), ("", ())])
def test_impersonation_headers_refuse_injection(user, groups):
    with pytest.raises(ValueError):
        identity_header_lines(user, groups)


def test_relay_keeps_a_clean_head_byte_for_byte():
    raw = b"HTTP/1.1 200 OK\r\nAudit-Id: 1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    assert relay_response_head(raw, keep_alive=True) is raw
    assert relay_response_head(raw, keep_alive=False) == raw[:-2] + b"Connection: close\r\n\r\n"


def test_relay_strips_hop_by_hop_lines():
    raw = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Keepalive-Info: kept\r\n"
           b"TE: trailers\r\nProxy-Connection: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert relay_response_head(raw, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nX-Keepalive-Info: kept\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_relay_strips_repeated_hop_by_hop_lines_in_any_case_and_keeps_the_rest_byte_for_byte():
    raw = (b"HTTP/1.1 200 OK\r\nCONNECTION: Keep-Alive\r\nX-Te: 1\r\nupgrade: h2c\r\ncOnNeCtIoN: close\r\n"
           b"Trailer: x\r\nContent-Length: 0\r\n\r\n")
    assert relay_response_head(raw, keep_alive=True) == b"HTTP/1.1 200 OK\r\nX-Te: 1\r\nContent-Length: 0\r\n\r\n"


def test_relay_rebuilds_when_a_later_connection_line_names_a_header():
    raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-Secret: 1\r\nConnection: x-secret\r\nContent-Length: 0\r\n\r\n"
    assert relay_response_head(raw, keep_alive=True) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def test_relay_removes_headers_named_by_connection():
    raw = b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nX-Public: 2\r\nContent-Length: 0\r\n\r\n"
    assert relay_response_head(raw, keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\nX-Public: 2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_relay_rewrites_an_http_1_0_status_line():
    raw = b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    assert relay_response_head(raw, keep_alive=True) == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def test_framing_detection():
    assert has_framing(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    assert has_framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert not has_framing(b"HTTP/1.1 200 OK\r\nX-Content-Length: 5\r\n\r\n")
