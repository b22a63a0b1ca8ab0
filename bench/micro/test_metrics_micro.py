"""The metrics observer's cost per request (start + finish), against the same metrics kept with
the official prometheus-client library, in its single-process and in its multiprocess mode.

Each round observes 1,000 fresh finished small-GET contexts (then flushes the batch, as the
gateway does every 100 ms); the time of a round in ms is the µs per request. "same object" GETs
one object again and again (a request target's labels are remembered); "new objects" names
another object in every request, so every one's are derived anew.

Run: .venv/bin/pytest bench/micro/test_metrics_micro.py --benchmark-enable
"""
from __future__ import annotations

import asyncio
import itertools

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from fastproxy.auth.requestinfo import request_verb
from fastproxy.clusters import ClusterRegistry
from fastproxy.config import parse_config
from fastproxy.context import Observers, RequestContext, RequestHead
from fastproxy.observe.metrics import DURATION_AT, DURATION_BUCKETS, SIZE_BUCKETS, Metrics
from fastproxy.routing import route

BATCH = 1000
HEADERS = [(b"Host", b"gateway"), (b"Authorization", b"Bearer x")]
_names = itertools.count()


def contexts(observer, new_objects: bool) -> tuple[tuple, dict]:
    """`observer` and a batch of finished small GETs as the connection leaves them (a round's setup)."""
    batch = []
    for _ in range(BATCH):
        name = f"small-{next(_names)}" if new_objects else "small"
        head = RequestHead(b"GET", f"/kubernetes/cluster/prod/api/v1/namespaces/default/configmaps/{name}".encode(),
                           b"1.1", HEADERS, b"10.0.0.7")
        ctx = RequestContext(head, 100.0)
        ctx.route = route(head.target.decode("latin-1"))
        ctx.status, ctx.bytes_out, ctx.first_byte, ctx.ended = 200, 1460, 100.0004, 100.0006
        batch.append(ctx)
    return (observer, batch), {}


def observe(observer, batch: list[RequestContext]) -> None:
    """As the connection drives the observers, then the flush the gateway makes every 100 ms."""
    observers = Observers([observer])
    start, finish = observers.start, observers.finish
    for ctx in batch:
        start(ctx)
        finish(ctx)
    observers.flush()


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    token = tmp_path_factory.mktemp("metrics-micro") / "token"
    token.write_text("t")
    config = parse_config({"clusters": [{"name": "prod", "server": "https://10.0.0.1:6443", "token_file": str(token)}]})
    return config, ClusterRegistry(asyncio.new_event_loop(), config.clusters)


class LibraryObserver:
    """The same series with prometheus-client, used at its fastest: the label children of each
    label tuple looked up once and kept, so a request costs one dict lookup and the updates."""

    def __init__(self, registry: CollectorRegistry, clusters: ClusterRegistry):
        labels = ("endpoint", "cluster", "verb")
        self.requests = Counter("fastproxy_requests", "", (*labels, "code"), registry=registry)
        self.duration = Histogram("fastproxy_request_duration_seconds", "", labels, buckets=DURATION_BUCKETS,
                                  registry=registry)
        self.first_byte = Histogram("fastproxy_response_first_byte_seconds", "", labels, buckets=DURATION_BUCKETS,
                                    registry=registry)
        self.size = Histogram("fastproxy_response_size_bytes", "", labels, buckets=SIZE_BUCKETS, registry=registry)
        self.received = Counter("fastproxy_received_bytes", "", labels[:2], registry=registry)
        self.sent = Counter("fastproxy_sent_bytes", "", labels[:2], registry=registry)
        self.in_flight = Gauge("fastproxy_requests_in_flight", "", registry=registry, multiprocess_mode="livesum")
        self.children: dict[tuple, tuple] = {}
        self.known = clusters.names

    def start(self, ctx: RequestContext) -> None:
        self.in_flight.inc()

    def finish(self, ctx: RequestContext) -> None:
        self.in_flight.dec()
        where = ctx.route
        cluster = where.cluster if where.cluster in self.known else ""
        key = (where.kind, cluster, request_verb(ctx.method, where.path, where.query), ctx.status)
        children = self.children.get(key)
        if children is None:
            route_labels = key[:3]
            children = self.children[key] = (
                self.requests.labels(*key), self.duration.labels(*route_labels), self.first_byte.labels(*route_labels),
                self.size.labels(*route_labels), self.received.labels(*key[:2]), self.sent.labels(*key[:2]))
        requests, duration, first_byte, size, received, sent = children
        requests.inc()
        duration.observe(ctx.ended - ctx.started)
        if ctx.first_byte:
            first_byte.observe(ctx.first_byte - ctx.started)
        size.observe(ctx.bytes_out)
        received.inc(ctx.bytes_in)
        sent.inc(ctx.bytes_out)


def run(benchmark, observer, new_objects: bool) -> int:
    """The requests observed: 205 rounds of BATCH, or one round with --benchmark-disable."""
    rounds = []

    def setup():
        rounds.append(1)
        return contexts(observer, new_objects)
    benchmark.pedantic(observe, setup=setup, rounds=200, warmup_rounds=5)
    benchmark.extra_info["requests_per_round"] = BATCH
    return len(rounds) * BATCH


@pytest.mark.parametrize("new_objects", [False, True], ids=["same object", "new objects"])
def test_hand_written_observer(benchmark, clusters, new_objects):
    config, registry = clusters
    metrics = Metrics(config, registry, authenticator=None)
    observed = run(benchmark, metrics, new_objects)
    assert metrics.in_flight == 0
    assert sum(metrics.short[("cluster", "prod", "get")][200][DURATION_AT:]) == observed


@pytest.mark.parametrize("new_objects", [False, True], ids=["same object", "new objects"])
def test_prometheus_client_observer(benchmark, clusters, new_objects):
    run(benchmark, LibraryObserver(CollectorRegistry(), clusters[1]), new_objects)


def test_prometheus_client_multiprocess_observer(benchmark, clusters, tmp_path, monkeypatch):
    """What `workers = N` would take with the library: every update goes to a per-process mmap file."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    run(benchmark, LibraryObserver(CollectorRegistry(), clusters[1]), False)
