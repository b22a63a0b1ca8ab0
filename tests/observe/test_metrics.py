"""The metrics observer's parts: verbs and labels kept bounded, histograms, gauges, the text
format (read back with prometheus-client's parser), adding up workers, and who may scrape."""
from __future__ import annotations

import asyncio
import base64
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastproxy import headers as hdrs
from fastproxy.auth.credentials import Authenticator
from fastproxy.auth.identity import Identity
from fastproxy.auth.requestinfo import request_info
from fastproxy.auth.scopes import load_scope
from fastproxy.auth.tokens import KeySet, issue_token
from fastproxy.clusters import ClusterRegistry
from fastproxy.config import ConfigError, parse_config
from fastproxy.context import RequestContext, RequestHead
from fastproxy.observe import metrics as m
from fastproxy.routing import route
from fastproxy.status import StatusError

ISSUER = "https://gateway.example"


@pytest.fixture
def config(tmp_path):
    (tmp_path / "token").write_text("t")
    return parse_config({"clusters": [{"name": "prod", "server": "https://10.0.0.1:6443",
                                       "token_file": str(tmp_path / "token")}]})


@pytest.fixture
def observer(config):
    loop = asyncio.new_event_loop()
    yield m.Metrics(config, ClusterRegistry(loop, config.clusters), authenticator=None)
    loop.close()


def request(target: str, method: bytes = b"GET", *, upgrade: bool = False, routed: bool = True) -> RequestContext:
    ctx = RequestContext(RequestHead(method, target.encode(), b"1.1", [], b"10.0.0.1", upgrade), 10.0)
    if routed:
        ctx.route = route(target)
    return ctx


def finished(ctx: RequestContext, status: int = 200, *, duration: float = 0.003, first_byte: float = 0.002,
             sent: int = 1500, received: int = 0, message: str = "") -> RequestContext:
    ctx.status, ctx.bytes_out, ctx.bytes_in, ctx.message = status, sent, received, message
    ctx.first_byte = ctx.started + first_byte if first_byte else 0.0
    ctx.ended = ctx.started + duration
    return ctx


def scrape(observer: m.Metrics) -> dict[str, dict[tuple, float]]:
    """Family name -> {sorted label pairs (with the sample name first) -> value}."""
    families: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(m.render(observer.state(), [m.process_figures(0) or (0, 0, 0, 0, 0, 0)])
                                                 .decode()):
        for sample in family.samples:
            families.setdefault(family.name, {})[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return families


def value(families, family: str, sample: str | None = None, **labels) -> float:
    return families[family][(sample or family, *sorted(labels.items()))]


# --- verbs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, query", [
    (b"GET", "/api/v1/namespaces/dev/pods", "watch=1"), (b"DELETE", "/api/v1/pods", ""),
    (b"OPTIONS", "/api/v1/pods", ""), (b"PROPFIND", "/api/v1/pods/web", ""), (b"OPTIONS", "/healthz", ""),
    (b"PROPFIND", "/healthz", ""), (b"PROPFIND", "/api/v1/watch", ""), (b"HEAD", "/version", ""),
])
def test_the_verb_label_is_request_infos_verb_bounded(observer, method, path, query):
    ctx = request(f"/kubernetes/cluster/prod{path}" + (f"?{query}" if query else ""), method)
    observer.finish_batch([finished(ctx, 200)])
    expected = request_info(method.decode(), path, query).verb
    assert [verb for _, _, verb in observer.short] == [expected if expected in m.VERBS else "other"]


# --- the observer --------------------------------------------------------------------------

def test_a_request_is_counted_with_bounded_labels(observer):
    for ctx in (request("/kubernetes/cluster/prod/api/v1/namespaces/dev/pods/web"),
                request("/kubernetes/cluster/prod/api/v1/namespaces/dev/pods/web"),
                request("/kubernetes/cluster/elsewhere/api/v1/pods"),  # not a configured cluster
                request("/healthz", b"PROPFIND"),
                request("/anything/at/all", routed=False)):
        observer.start_batch([ctx])
        observer.finish_batch([finished(ctx, 404 if ctx.route is None else 200)])
    assert observer.in_flight == 0
    families = scrape(observer)
    requests = families["fastproxy_requests"]
    assert {key: count for key, count in requests.items()} == {
        ("fastproxy_requests_total", ("cluster", "prod"), ("code", "200"), ("endpoint", "cluster"), ("verb", "get")): 2,
        ("fastproxy_requests_total", ("cluster", ""), ("code", "200"), ("endpoint", "cluster"), ("verb", "list")): 1,
        ("fastproxy_requests_total", ("cluster", ""), ("code", "200"), ("endpoint", "health"), ("verb", "other")): 1,
        ("fastproxy_requests_total", ("cluster", ""), ("code", "404"), ("endpoint", "none"), ("verb", "")): 1,
    }
    assert value(families, "fastproxy_sent_bytes", "fastproxy_sent_bytes_total", endpoint="cluster", cluster="prod") == 3000


def test_histograms_count_each_request_in_its_bucket(observer):
    for duration, first_byte, sent in ((0.0004, 0.0003, 100), (0.02, 0.015, 5000), (7.0, 6.5, 300_000)):
        ctx = request("/kubernetes/cluster/prod/api/v1/namespaces/dev/configmaps")
        observer.start_batch([ctx])
        observer.finish_batch([finished(ctx, duration=duration, first_byte=first_byte, sent=sent)])
    families = scrape(observer)
    labels = {"endpoint": "cluster", "cluster": "prod", "verb": "list"}

    def bucket(family, le):
        return value(families, family, family + "_bucket", le=le, **labels)
    duration = "fastproxy_request_duration_seconds"
    assert [bucket(duration, le) for le in ("0.001", "0.025", "5.0", "10.0", "+Inf")] == [1, 2, 2, 3, 3]
    assert value(families, duration, duration + "_count", **labels) == 3
    assert value(families, duration, duration + "_sum", **labels) == pytest.approx(7.0204)
    first_byte = "fastproxy_response_first_byte_seconds"
    assert [bucket(first_byte, le) for le in ("0.001", "0.025", "10.0")] == [1, 2, 3]
    size = "fastproxy_response_size_bytes"
    assert [bucket(size, le) for le in ("256.0", "16384.0", "262144.0", "1.048576e+06")] == [1, 2, 2, 3]
    assert value(families, size, size + "_sum", **labels) == 305_100


def test_values_on_a_bound_count_in_its_bucket(observer):
    """A value equal to a bucket's bound is in that bucket (le), whichever way its index is found."""
    cases = ((0.001, 0.001, 256), (0.0025, 0.0025, 1024), (0.0011, 0.0011, 4096), (7.0, 5.0, 4097), (0.0004, 0.0, 257))
    for duration, first_byte, sent in cases:
        observer.finish_batch([finished(request("/kubernetes/cluster/prod/api/v1/namespaces/dev/configmaps"),
                                        duration=duration, first_byte=first_byte, sent=sent)])
    families = scrape(observer)
    labels = {"endpoint": "cluster", "cluster": "prod", "verb": "list"}

    def buckets(family, bounds):
        return [value(families, family, family + "_bucket", le=le, **labels) for le in bounds]
    assert buckets("fastproxy_request_duration_seconds", ("0.001", "0.0025", "5.0", "10.0")) == [2, 4, 4, 5]
    assert buckets("fastproxy_response_first_byte_seconds", ("0.001", "0.0025", "5.0")) == [1, 3, 4]
    assert buckets("fastproxy_response_size_bytes", ("256.0", "1024.0", "4096.0", "16384.0")) == [1, 3, 4, 5]


def test_long_running_requests_have_their_own_histogram_and_gauges(observer):
    watch = request("/kubernetes/cluster/prod/api/v1/pods?watch=true")
    tunnel = request("/kubernetes/cluster/prod/api/v1/namespaces/a/pods/p/exec?command=sh", b"POST", upgrade=True)
    plain = request("/kubernetes/cluster/prod/api/v1/pods")
    for ctx in (watch, tunnel, plain):
        observer.start_batch([ctx])
    families = scrape(observer)
    assert value(families, "fastproxy_watches_open", cluster="prod") == 1
    assert value(families, "fastproxy_tunnels_open", cluster="prod") == 1
    assert value(families, "fastproxy_requests_in_flight") == 1
    observer.finish_batch([finished(watch, duration=120.0)])
    observer.finish_batch([finished(tunnel, 101, duration=3.0, received=5000)])
    observer.finish_batch([finished(plain)])
    families = scrape(observer)
    assert value(families, "fastproxy_watches_open", cluster="prod") == 0
    assert value(families, "fastproxy_tunnels_open", cluster="prod") == 0
    assert value(families, "fastproxy_requests_in_flight") == 0
    long = "fastproxy_long_running_request_duration_seconds"
    assert value(families, long, long + "_count", endpoint="cluster", cluster="prod", verb="watch") == 1
    assert value(families, long, long + "_bucket", endpoint="cluster", cluster="prod", verb="watch", le="300.0") == 1
    assert value(families, long, long + "_bucket", endpoint="cluster", cluster="prod", verb="watch", le="60.0") == 0
    assert value(families, long, long + "_count", endpoint="cluster", cluster="prod", verb="create") == 1
    duration = "fastproxy_request_duration_seconds"
    assert {labels for labels in families[duration] if ("verb", "watch") in labels} == set()
    assert value(families, "fastproxy_received_bytes", "fastproxy_received_bytes_total",
                 endpoint="cluster", cluster="prod") == 5000


def test_a_watch_counted_on_a_cluster_removed_meanwhile_leaves_its_gauge(observer):
    watch = request("/kubernetes/cluster/prod/api/v1/pods?watch=1")
    observer.start_batch([watch])
    observer.clusters.remove("prod")
    observer.finish_batch([finished(watch)])
    assert observer.watches == {"prod": 0}


def test_targets_are_remembered_boundedly(observer, monkeypatch):
    monkeypatch.setattr(m, "TARGET_MEMO", 10)
    for n in range(25):
        ctx = request(f"/kubernetes/cluster/prod/api/v1/namespaces/dev/pods/p{n}")
        observer.start_batch([ctx])
        observer.finish_batch([finished(ctx)])
    assert len(observer._targets) <= 10
    assert sum(observer.short[("cluster", "prod", "get")][200][m.DURATION_AT:]) == 25
    observer.tick()
    assert observer._targets == {}


# --- authentication failures -----------------------------------------------------------------

def refusal(call) -> str:
    with pytest.raises(StatusError) as raised:
        call()
    assert raised.value.code == 401
    return m.auth_failure_reason(raised.value.message)


def test_every_401_has_its_reason(tmp_path):
    keys = KeySet(tmp_path / "keys")
    revoked = issue_token(keys, issuer=ISSUER, subject="bob", audience="prod", groups=[], ttl=600)
    claims = orjson.loads(base64.urlsafe_b64decode(revoked.split(".")[1] + "=="))
    (tmp_path / "revoked.txt").write_text(claims["jti"] + "\n")
    config = parse_config({"tokens": {"issuer": ISSUER, "signing_keys_dir": str(tmp_path / "keys"),
                                      "revocation_file": str(tmp_path / "revoked.txt")}})
    authenticator = Authenticator(config)

    def presented(*headers):
        return lambda: hdrs.bearer_credential(hdrs.scan_client_headers(list(headers)), None)

    def token(**overrides):
        arguments = dict(issuer=ISSUER, subject="bob", audience="prod", groups=[], ttl=600)
        arguments.update(overrides)
        return issue_token(keys, **arguments).encode()
    assert refusal(presented()) == "missing"
    assert refusal(presented((b"Authorization", b"Basic Ym9iOnNlY3JldA=="))) == "malformed"
    assert refusal(lambda: authenticator.authenticate(b"not-a-key", "prod")) == "invalid_key"
    assert refusal(lambda: authenticator.authenticate(b"a.b.c", "prod")) == "malformed"
    assert refusal(lambda: authenticator.authenticate(token(ttl=60, now=time.time() - 3600), "prod")) == "expired_token"
    assert refusal(lambda: authenticator.authenticate(revoked.encode(), "prod")) == "revoked_token"
    assert refusal(lambda: authenticator.authenticate(token(), "dev")) == "wrong_cluster"
    assert refusal(lambda: authenticator.authenticate(token(issuer="https://elsewhere"), "prod")) == "invalid_key"
    header, payload, signature = token().decode().split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA".encode()
    assert refusal(lambda: authenticator.authenticate(forged, "prod")) == "invalid_key"
    authenticator.close()


def test_401s_are_counted_by_reason(observer):
    for message in ("Unauthorized: a bearer access key is required", "Unauthorized: invalid access key",
                    "Unauthorized: invalid access key", "Unauthorized: token has expired"):
        ctx = request("/kubernetes/cluster/prod/api/v1/pods")
        observer.start_batch([ctx])
        observer.finish_batch([finished(ctx, 401, message=message)])
    assert observer.auth_failures == {"missing": 1, "invalid_key": 2, "expired_token": 1, "revoked_token": 0,
                                      "wrong_cluster": 0, "malformed": 0}


# --- who may scrape --------------------------------------------------------------------------

def identity(groups, scope=None) -> Identity:
    return Identity("someone", tuple(groups), "key", b"", load_scope(scope) if scope is not None else None)


def test_who_may_scrape():
    assert m.may_scrape(identity(["loft:admins"]))
    assert m.may_scrape(identity(["dev", "system:masters"]))
    assert not m.may_scrape(identity(["dev"]))
    assert not m.may_scrape(identity(["dev"], {"rules": [{"nonResourceURLs": ["/metrics"]}]}))  # a scope never widens
    assert m.may_scrape(identity(["loft:admins"], {"rules": [{"verbs": ["get"], "nonResourceURLs": ["/metrics"]}]}))
    assert m.may_scrape(identity(["loft:admins"], {"rules": [{"nonResourceURLs": ["/*"], "requestTargets": ["Management"]}]}))
    assert not m.may_scrape(identity(["loft:admins"], {"rules": [{"nonResourceURLs": ["/metrics"],
                                                                 "requestTargets": ["Cluster"]}]}))
    assert not m.may_scrape(identity(["loft:admins"], {"clusters": [{"cluster": "*"}]}))
    assert not m.may_scrape(identity(["loft:admins"], {"rules": [{"verbs": ["list"], "nonResourceURLs": ["/metrics"]}]}))


def test_the_metrics_section(tmp_path):
    assert parse_config({}).metrics == parse_config({"metrics": {}}).metrics
    assert parse_config({}).metrics.enabled and not parse_config({}).metrics.open
    metrics = parse_config({"metrics": {"enabled": False, "open": True}}).metrics
    assert (metrics.enabled, metrics.open) == (False, True)
    with pytest.raises(ConfigError, match=r"^metrics.port: unknown key$"):
        parse_config({"metrics": {"port": 9090}})
    with pytest.raises(ConfigError, match=r"^metrics.open: must be true or false, not 'yes'$"):
        parse_config({"metrics": {"open": "yes"}})


# --- workers ---------------------------------------------------------------------------------

def test_workers_add_up_and_an_ended_workers_counters_stay(observer, tmp_path):
    ctx = request("/kubernetes/cluster/prod/api/v1/pods?watch=1")
    observer.start_batch([ctx])  # a watch still open on the worker that ends
    for _ in range(3):
        get = request("/kubernetes/cluster/prod/api/v1/pods")
        observer.start_batch([get])
        observer.finish_batch([finished(get)])
    observer.auth_failures["missing"] += 2
    observer.clusters.stats["prod"].dials += 4
    folder = str(tmp_path)
    m.write_state(folder, 101, observer.state())
    m.write_state(folder, 102, observer.state())
    states = dict(m.read_states(folder, exclude=102))
    assert list(states) == [101]
    both = m.merge([states[101], observer.state()])
    assert both["watches"] == {"prod": 2} and both["auth_failures"]["missing"] == 4
    assert both["pools"]["prod"][2] == 8
    [row] = both["short"]
    assert sum(row[4 + m.DURATION_AT:]) == 6

    m.retire_worker(folder, 101)
    m.retire_worker(folder, 102)
    assert sorted(name for name in (tmp_path.iterdir()) if name.suffix == ".json") == [tmp_path / "retired.json"]
    [(pid, retired)] = m.read_states(folder)
    assert pid == 0 and retired["watches"] == {"prod": 0} and retired["in_flight"] == 0
    assert retired["auth_failures"]["missing"] == 4 and retired["pools"]["prod"][2] == 8
    assert sum(retired["short"][0][4 + m.DURATION_AT:]) == 6
