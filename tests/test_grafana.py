"""The Grafana proxy's decisions, without sockets: its table, the header pass, the head rewrite."""
from __future__ import annotations

import pytest

from fastproxy.config import ConfigError, parse_config
from fastproxy.grafana.rewrite import (
    auth_proxy_lines,
    from_own_site,
    grafana_request_headers,
    rewrite_location,
    rewrite_response_head,
    rewrite_set_cookie,
)
from fastproxy.status import StatusError

PREFIX, ORIGIN, COOKIE = b"/grafana/prod", b"http://grafana.monitoring:3000", b"loft_access_key"


def config(grafana: dict):
    cluster = {"name": "prod", "server": "https://10.0.0.1:6443", "token_file": __file__}
    return parse_config({"clusters": [cluster], "grafana": grafana}).grafana


def test_the_table_with_its_defaults():
    grafana = config({"clusters": [{"cluster": "prod", "url": "https://grafana.monitoring"}]})
    assert (grafana.user_header, grafana.groups_header, grafana.access_key_cookie) == \
        ("X-WEBAUTH-USER", "X-WEBAUTH-GROUPS", "loft_access_key")
    (server,) = grafana.servers
    assert (server.name, server.scheme, server.host, server.port, server.token_file) == \
        ("prod", "https", "grafana.monitoring", 443, None)


@pytest.mark.parametrize("grafana, message", [
    ({"clusters": [{"cluster": "dev", "url": "http://g"}]}, "grafana.clusters[0].cluster: no [[clusters]] entry is named 'dev'"),
    ({"clusters": [{"cluster": "prod", "url": "http://g/grafana"}]}, "grafana.clusters[0].url: must be an https://HOST[:PORT] URL"),
    ({"clusters": [{"cluster": "prod"}]}, "grafana.clusters[0].url: is required"),
    ({"clusters": [{"cluster": "prod", "url": "http://g", "ca_file": __file__, "insecure_skip_tls_verify": True}]},
     "grafana.clusters[0].insecure_skip_tls_verify: cannot be combined with ca_file"),
    ({"clusters": [{"cluster": "prod", "url": "http://g"}, {"cluster": "prod", "url": "http://h"}]},
     "grafana.clusters[1].cluster: cluster 'prod' already has a Grafana"),
    ({"clusters": [{"cluster": "prod", "url": "http://g", "path": "/"}]}, "grafana.clusters[0].path: unknown key"),
    ({"user_header": "X-User: admin"}, "grafana.user_header: must be a header or cookie name"),
    ({"user_header": ""}, "grafana.user_header: must be a header or cookie name"),
    ({"groups_header": "x-webauth-user"}, "grafana.groups_header: must differ from user_header"),
    ({"access_key_cookie": "a;b"}, "grafana.access_key_cookie: must be a header or cookie name"),
    ({"header": "X"}, "grafana.header: unknown key"),
])
def test_a_bad_key_is_named(grafana, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        config(grafana)


def test_groups_may_be_left_out():
    assert config({"groups_header": ""}).groups_header == ""


def test_the_client_credential_and_forged_auth_proxy_headers_are_taken_out():
    kept = [(b"Accept", b"*/*"), (b"X-WEBAUTH-USER", b"admin"), (b"x-webauth-role", b"Admin"), (b"X-Groups", b"admins"),
            (b"Cookie", b"grafana_session=s; theme=dark; ; "), (b"Cookie", b"loft_access_key=\"KEY\"")]
    headers, credential = grafana_request_headers(kept, frozenset((b"x-webauth-user", b"x-groups")), COOKIE)
    assert headers == [(b"Accept", b"*/*"), (b"Cookie", b"grafana_session=s; theme=dark")]
    assert credential == b"KEY"


def test_two_access_key_cookies_are_refused():
    with pytest.raises(StatusError) as refused:
        grafana_request_headers([(b"Cookie", b"loft_access_key=A; x=1"), (b"Cookie", b"loft_access_key=B")], frozenset(), COOKIE)
    assert refused.value.code == 401
    assert grafana_request_headers([(b"Cookie", b"other=1")], frozenset(), COOKIE) == ([(b"Cookie", b"other=1")], None)


def test_the_caller_as_grafana_reads_it():
    assert auth_proxy_lines(b"X-WEBAUTH-USER", "alice", b"X-WEBAUTH-GROUPS", ("dev", "a,b", "ops")) == \
        b"X-WEBAUTH-USER: alice\r\nX-WEBAUTH-GROUPS: dev,ops\r\n", "a group holding a comma is not split into two"
    assert auth_proxy_lines(b"X-WEBAUTH-USER", "alice", b"", ("dev",)) == b"X-WEBAUTH-USER: alice\r\n"
    assert auth_proxy_lines(b"X-WEBAUTH-USER", "alice", b"X-WEBAUTH-GROUPS", ()) == b"X-WEBAUTH-USER: alice\r\n"


@pytest.mark.parametrize("location, expected", [
    (b"/login", b"/grafana/prod/login"),
    (b"/", b"/grafana/prod/"),
    (b"/grafana/prod/login", b"/grafana/prod/login"),  # a Grafana whose root_url has the sub-path
    (b"/grafana/production", b"/grafana/prod/grafana/production"),
    (b"http://grafana.monitoring:3000/d/x?orgId=1", b"/grafana/prod/d/x?orgId=1"),
    (b"HTTP://Grafana.Monitoring:3000", b"/grafana/prod/"),
    (b"http://grafana.monitoring:30000/x", b"http://grafana.monitoring:30000/x"),
    (b"https://login.example.com/authorize", b"https://login.example.com/authorize"),
    (b"//evil.example.com/x", b"//evil.example.com/x"),
    (b"login", b"login"),
])
def test_location(location, expected):
    assert rewrite_location(location, PREFIX, ORIGIN) == expected


@pytest.mark.parametrize("cookie, expected", [
    (b"grafana_session=s; Path=/; HttpOnly", b"grafana_session=s; Path=/grafana/prod/; HttpOnly"),
    (b"a=b; path=/api; Domain=.grafana.monitoring; Secure", b"a=b; Path=/grafana/prod/api; Secure"),
    (b"a=b; Path=/grafana/prod/", b"a=b; Path=/grafana/prod/"),
    (b"a=b; Path=relative", b"a=b; Path=/grafana/prod/"),
    (b"a=b; Max-Age=0", b"a=b; Max-Age=0"),
    (b"loft_access_key=planted; Path=/", None),
    (b" loft_access_key =x", None),
])
def test_set_cookie(cookie, expected):
    assert rewrite_set_cookie(cookie, PREFIX, COOKIE) == expected


def test_a_head_without_location_or_cookies_is_the_same_bytes():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\n"
    assert rewrite_response_head(head, PREFIX, ORIGIN, COOKIE) is head


def test_a_head_is_rewritten_line_by_line_with_its_status_line():
    head = (b"HTTP/1.1 302 Found\r\nLocation: /login\r\nSet-Cookie: a=1; Path=/\r\n"
            b"Set-Cookie: loft_access_key=x\r\nContent-Length: 0\r\n\r\n")
    assert rewrite_response_head(head, PREFIX, ORIGIN, COOKIE) == (
        b"HTTP/1.1 302 Found\r\nLocation: /grafana/prod/login\r\nSet-Cookie: a=1; Path=/grafana/prod/\r\n"
        b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize("headers, expected", [
    ([(b"Host", b"gw.example.com"), (b"Origin", b"https://gw.example.com")], True),
    ([(b"host", b"GW.example.com:8443"), (b"origin", b"https://gw.example.com:8443")], True),
    ([(b"Host", b"gw.example.com"), (b"Origin", b"https://evil.example.com")], False),
    ([(b"Host", b"gw.example.com"), (b"Origin", b"https://gw.example.com.evil.example")], False),
    ([(b"Host", b"gw.example.com"), (b"Origin", b"null")], False),
    ([(b"Host", b"gw.example.com")], False),
    ([(b"Origin", b"https://gw.example.com")], False),
])
def test_from_own_site(headers, expected):
    assert from_own_site(headers) is expected
