"""What authentication adds per request, on the gateway's real objects (no sockets).

Run: .venv/bin/pytest bench/micro --benchmark-enable
The targets: a cached state-store key and a cached token each cost under 5 µs to authenticate.
"""
from __future__ import annotations

import pytest

from bench.micro.support import gateway_config, parse_head, plan
from fastproxy.auth.tokens import KeySet, issue_token
from fastproxy.context import RequestHead
from fastproxy.gateway import Gateway
from fastproxy.store import SqliteStore

STATIC_KEY = "bench-static-key-0123456789abcdef"
ISSUER = "https://bench.example"
SCOPE = {"clusters": [{"cluster": "staging"}],
         "rules": [{"verbs": ["get", "list", "watch"], "namespaces": ["default", "qa"],
                    "resources": [{"group": "", "resources": ["pods", "pods/log"]}]}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("identity-micro")
    store = SqliteStore(folder / "state.db")
    store.create_user("alice", groups=["devs"])
    keys = {}
    for index in range(1000):  # a realistic number of keys to look the one among
        _, key = store.create_access_key(user="alice", name=f"key-{index}")
        keys.setdefault("store", key)
    _, keys["scoped"] = store.create_access_key(user="alice", name="scoped", scope=SCOPE)
    store.close()
    config = gateway_config(folder, STATIC_KEY, groups=["dev"], state={"path": str(folder / "state.db")},
                            tokens={"issuer": ISSUER, "signing_keys_dir": str(folder / "keys")})
    gateway = Gateway(config, loop=None)
    keys["token"] = issue_token(KeySet(folder / "keys"), issuer=ISSUER, subject="alice", audience="prod",
                                groups=["devs"], ttl=3600)
    yield gateway, keys
    gateway.close()


def fresh(text: str) -> bytes:
    """A credential as the parser hands it over: a new bytes object every request."""
    return text.encode()


def test_authenticate_static_key(benchmark, setup):
    gateway, _ = setup
    identity = benchmark(lambda: gateway.authenticator.authenticate(fresh(STATIC_KEY), "prod"))
    assert identity.user == "bench-user"


def test_authenticate_cached_store_key(benchmark, setup):
    """A miss among the static keys, then the snapshot lookup and the activity note."""
    gateway, keys = setup
    identity = benchmark(lambda: gateway.authenticator.authenticate(fresh(keys["store"]), "prod"))
    assert identity.user == "alice"


def test_authenticate_cached_token(benchmark, setup):
    """Misses among both kinds of keys, then the verified-token cache."""
    gateway, keys = setup
    gateway.authenticator.authenticate(keys["token"].encode(), "prod")  # the one signature check
    identity = benchmark(lambda: gateway.authenticator.authenticate(fresh(keys["token"]), "prod"))
    assert identity.source.startswith("token:")


def head(key: str) -> RequestHead:
    return parse_head(
        b"GET /kubernetes/cluster/prod/api/v1/namespaces/qa/pods?limit=500 HTTP/1.1\r\nHost: gw\r\n"
        b"User-Agent: kubectl/v1.32.4\r\nAccept: application/json\r\nAuthorization: Bearer "
        + key.encode() + b"\r\n\r\n")


@pytest.mark.parametrize("kind", ["static", "store", "scoped"])
def test_plan_request(benchmark, setup, kind):
    """The whole plan: route, headers, authentication, the scope check when there is a scope."""
    gateway, keys = setup
    request = head(STATIC_KEY if kind == "static" else keys[kind])
    responder = benchmark(plan, gateway, request)
    assert b"Impersonate-User: " in responder.plan.head
