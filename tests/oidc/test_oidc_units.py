"""The pure parts of /oidc/: the [oidc] table, the login page and its CSRF check, the registered
clients' checks, the claims, and the single-use grants on a real SQLite state file."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from fastproxy.config import ConfigError, parse_config
from fastproxy.oidc.config import OidcClient, OidcConfig, parse_oidc_config
from fastproxy.oidc.endpoints import discovery
from fastproxy.oidc.page import CSRF_COOKIE, cookie_value, csrf_matches, login_page, page_headers
from fastproxy.oidc.provider import ACCESS, CODE, Client, Grant, Grants
from fastproxy.store.sqlite import SqliteStore

SECRET = "s3cret-" * 6
CLIENT = {"id": "dashboard", "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
          "redirect_uris": ["https://dash.example/callback", "http://127.0.0.1:8000/cb"]}
ISSUER = "https://gw.example/oidc"


def oidc(**changes):
    table = {"issuer": ISSUER, "clients": [CLIENT], **changes}
    return parse_oidc_config({name: value for name, value in table.items() if value is not None}, "https://gw.example")


def test_an_oidc_table_is_read_with_its_defaults():
    config = oidc()
    assert config == OidcConfig(ISSUER, (OidcClient("dashboard", CLIENT["secret_sha256"], tuple(CLIENT["redirect_uris"])),))
    assert (config.code_ttl, config.access_token_ttl, config.refresh_token_ttl) == (60, 600, 86400)
    assert oidc(issuer=ISSUER + "/").issuer == ISSUER


@pytest.mark.parametrize("changes,message", [
    ({"issuer": "http://gw.example/oidc"}, "oidc.issuer: must be the gateway's https URL ending in /oidc"),
    ({"issuer": "https://gw.example/other"}, "oidc.issuer: must be the gateway's https URL ending in /oidc"),
    ({"issuer": None}, "oidc.issuer: is required"),
    ({"code_ttl": 601}, "oidc.code_ttl: must be at most 600 seconds"),
    ({"code_ttl": 0}, "oidc.code_ttl: must be > 0"),
    ({"refresh": 1}, "oidc.refresh: unknown key"),
    ({"clients": [{**CLIENT, "secret_sha256": SECRET}]}, "oidc.clients[0].secret_sha256: must be the SHA-256"),
    ({"clients": [{**CLIENT, "redirect_uris": []}]}, "oidc.clients[0].redirect_uris: must list at least one"),
    ({"clients": [{**CLIENT, "redirect_uris": ["https://a.example/cb#x"]}]},
     "oidc.clients[0].redirect_uris[0]: must be an absolute URL without a fragment"),
    ({"clients": [{**CLIENT, "redirect_uris": ["http://a.example/cb"]}]},
     "oidc.clients[0].redirect_uris[0]: must be https (http only on a loopback address)"),
    ({"clients": [{**CLIENT, "redirect_uris": ["/cb"]}]}, "oidc.clients[0].redirect_uris[0]: must be an absolute URL"),
    ({"clients": [CLIENT, CLIENT]}, "oidc.clients[1].id: duplicate client id 'dashboard'"),
    ({"clients": [{**CLIENT, "id": "two words"}]}, "oidc.clients[0].id: must be a non-empty string without spaces"),
    ({"clients": [{**CLIENT, "secret": "x"}]}, "oidc.clients[0].secret: unknown key"),
])
def test_a_bad_oidc_table_is_refused_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as refused:
        oidc(**changes)
    assert str(refused.value).startswith(message), refused.value


def test_the_provider_needs_signing_keys_a_state_store_and_an_issuer_of_its_own():
    with pytest.raises(ConfigError, match=r"^oidc.issuer: must differ from tokens.issuer$"):
        parse_oidc_config({"issuer": ISSUER, "clients": [CLIENT]}, ISSUER + "/")
    with pytest.raises(ConfigError, match=r"^oidc.issuer: .* it needs \[tokens\] signing_keys_dir$"):
        parse_oidc_config({"issuer": ISSUER}, None)
    with pytest.raises(ConfigError, match=r"^oidc: .* it needs \[state\]$"):
        parse_config({"oidc": {"issuer": ISSUER}})


# ---- the login page ----

def test_the_csrf_cookie_is_found_once_or_not_at_all():
    assert cookie_value([b"a=1; " + CSRF_COOKIE.encode() + b"=tok; b=2"], CSRF_COOKIE) == "tok"
    assert cookie_value([b"a=1"], CSRF_COOKIE) is None
    assert cookie_value([CSRF_COOKIE.encode() + b"=one", CSRF_COOKIE.encode() + b"=two"], CSRF_COOKIE) is None
    assert csrf_matches("tok", "tok") and not csrf_matches("tok", "other")
    assert not csrf_matches("tok", None) and not csrf_matches("", "")


def test_the_login_page_escapes_what_the_request_carries_and_keeps_no_login_field():
    page = login_page('<b>"dash"</b>', {"state": '"><script>alert(1)</script>', "password": "leaked",
                                        "username": "x", "csrf_token": "old"}, "new-token", "Invalid <i>")
    assert b"<script" not in page and b"&lt;script&gt;" in page and b"&lt;b&gt;&quot;dash&quot;&lt;/b&gt;" in page
    assert b"leaked" not in page and b'value="old"' not in page and b'value="new-token"' in page
    assert b"Invalid &lt;i&gt;" in page and b"http" not in page  # no external asset


def test_the_page_may_post_to_the_gateway_and_the_redirect_uri_only():
    headers = dict(page_headers("https://dash.example:8443/callback?x=1"))
    policy = headers[b"Content-Security-Policy"].decode()
    assert "default-src 'none'" in policy and "form-action 'self' https://dash.example:8443;" in policy
    assert headers[b"X-Frame-Options"] == b"DENY" and "frame-ancestors 'none'" in policy


# ---- clients and grants ----

def test_a_client_matches_its_redirect_uris_exactly_and_its_secret_by_hash():
    client = Client(oidc().clients[0])
    assert client.check_redirect_uri("https://dash.example/callback")
    for near in ("https://dash.example/callback/", "https://dash.example/callback?x=1", "https://DASH.example/callback",
                 "https://dash.example/callback#", "https://dash.example/callback/../callback"):
        assert not client.check_redirect_uri(near), near
    assert client.check_client_secret(SECRET) and not client.check_client_secret(SECRET + "x")
    assert client.get_allowed_scope("openid email admin") == "openid email"
    assert client.check_response_type("code") and not client.check_response_type("token")


def test_discovery_names_the_endpoints_below_the_issuer():
    document = discovery(ISSUER, "ES256")
    assert document["token_endpoint"] == ISSUER + "/token" and document["jwks_uri"] == ISSUER + "/jwks"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["id_token_signing_alg_values_supported"] == ["ES256"]


@pytest.fixture
def new_store(tmp_path):
    """Opens another connection to the grants' store: each taker of a code its own."""
    return lambda: SqliteStore(tmp_path / "state.db")


@pytest.fixture
def grants(new_store):
    store = new_store()
    yield Grants(store)
    store.close()


GRANT = Grant("alice", "dashboard", "openid", 1, redirect_uri="https://dash.example/callback")


def test_a_code_is_taken_once_and_only_as_its_kind(grants):
    grants.put(CODE, "the-code", GRANT, 60)
    assert grants.read(ACCESS, "the-code") is None and grants.take(ACCESS, "the-code") is None
    assert grants.take(CODE, "the-code") == GRANT
    assert grants.take(CODE, "the-code") is None
    assert grants.store.take_grant(hashlib.sha256(b"never-kept").digest(), CODE, time.time()) is None


def test_an_access_token_is_read_many_times_until_it_expires(grants):
    grants.put(ACCESS, "token", GRANT, 1)
    assert grants.read(ACCESS, "token") == GRANT == grants.read(ACCESS, "token")
    time.sleep(1.1)
    assert grants.read(ACCESS, "token") is None and grants.take(ACCESS, "token") is None


def test_the_store_keeps_digests_not_secrets(grants, tmp_path):
    grants.put(CODE, "visible-secret-value", GRANT, 60)
    assert b"visible-secret-value" not in (tmp_path / "state.db").read_bytes() + b"".join(
        path.read_bytes() for path in tmp_path.glob("state.db-*"))


def test_of_many_takers_of_one_code_exactly_one_gets_it(grants, new_store):
    grants.put(CODE, "raced", GRANT, 60)
    stores = [Grants(new_store()) for _ in range(8)]  # each its own connection
    got: list[Grant | None] = []
    start = threading.Barrier(len(stores))

    def take(each: Grants) -> None:
        start.wait()
        got.append(each.take(CODE, "raced"))

    threads = [threading.Thread(target=take, args=(each,)) for each in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got.count(GRANT) == 1 and got.count(None) == len(stores) - 1
    for each in stores:
        each.store.close()
