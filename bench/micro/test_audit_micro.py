"""The audit observer's cost per request: both events of a batch of BATCH requests made and queued.

Run: .venv/bin/pytest bench/micro/test_audit_micro.py --benchmark-enable (times are per batch:
divide by BATCH for a request)

The requests are the kubectl GET of the proxy micro-benchmarks, routed and authenticated as the
gateway leaves them for its observers, handed over as the gateway does every 0.1 s: begun and
finished since the last batch (a small GET's usual case), or begun in one batch and finished in
the next (a slower request's). The writer thread runs; its sink discards the lines (what is
measured is the event loop's side, not the disk), except in the last benchmark, which writes a
real file under pytest's tmp_path.
"""
from __future__ import annotations

import time

import pytest

from bench.micro.support import parse_head
from bench.micro.test_proxy_micro import KUBECTL_HEAD
from fastproxy.auth.identity import Identity
from fastproxy.context import RequestContext, RequestIds
from fastproxy.observe.audit import AuditConfig, AuditObserver, parse_policy
from fastproxy.routing import route

IDENTITY = Identity("bench-user", ("dev", "ops", "system:authenticated"), "static", b"")
# A policy as operators write them: health checks and the system's own users off, the rest Metadata.
POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "users": ["system:kube-proxy"], "verbs": ["watch"]},
        {"level": "None", "nonResourceURLs": ["/healthz*", "/version"]},
        {"level": "None", "userGroups": ["dev"]},
        {"level": "Metadata"},
    ],
}


class DiscardingSink:
    def write(self, lines):
        pass

    def maintain(self):
        pass

    def close(self):
        pass


def request_context() -> RequestContext:
    head = parse_head(KUBECTL_HEAD)
    ctx = RequestContext(head, time.monotonic())
    ctx.route = route(head.target.decode("latin-1"))
    ctx.identity = IDENTITY
    assert ctx.info is not None
    return ctx


def observer(folder, policy=None, *, discard=True) -> AuditObserver:
    config = AuditConfig(path=str(folder / "audit.log"), **({"policy": parse_policy(policy)} if policy else {}))
    return AuditObserver(config, max_queued=1 << 20, max_queued_bytes=1 << 32, sink=DiscardingSink() if discard else None)


BATCH = 100


def finished_batch(audit: AuditObserver, batch: list[RequestContext]) -> None:
    """Requests begun and finished since the last batch."""
    audit.start_batch(batch)
    audit.finish_batch(batch)


def two_batches(audit: AuditObserver, batch: list[RequestContext]) -> None:
    """Requests begun in one batch and finished in the next."""
    for ctx in batch:
        ctx.ended = 0.0
    audit.start_batch(batch)
    ended = time.monotonic()
    for ctx in batch:
        ctx.ended = ended
    audit.finish_batch(batch)


@pytest.fixture
def batch():
    ids = RequestIds()
    contexts = [request_context() for _ in range(BATCH)]
    for ctx in contexts:
        ids.assign(ctx)
        ctx.status = 200
        ctx.first_byte = ctx.ended = time.monotonic()
    return contexts


def test_level_none(benchmark, tmp_path, batch):
    """Requests the policy does not log: the third rule (a group of the user) says None."""
    audit = observer(tmp_path, POLICY)
    benchmark(finished_batch, audit, batch)
    audit.close()
    assert audit.writer.queued_bytes == 0 and not audit.requests


def test_level_metadata(benchmark, tmp_path, batch):
    """The default policy (Metadata for everything): RequestReceived and ResponseComplete."""
    audit = observer(tmp_path)
    benchmark(finished_batch, audit, batch)
    audit.close()
    assert audit.writer.written > 0 and audit.dropped == 0


def test_level_metadata_over_two_batches(benchmark, tmp_path, batch):
    """The default policy, each request's start and finish in batches of their own."""
    audit = observer(tmp_path)
    benchmark(two_batches, audit, batch)
    audit.close()
    assert audit.writer.written > 0 and audit.dropped == 0 and not audit.requests


def test_level_metadata_policy(benchmark, tmp_path, batch):
    """The operator's policy, evaluated to its last rule: Metadata, ResponseComplete only."""
    audit = observer(tmp_path, POLICY)
    alice = Identity("alice", ("qa",), "alice-laptop", b"")
    for ctx in batch:
        ctx.identity = alice
    benchmark(finished_batch, audit, batch)
    audit.close()
    assert audit.writer.written > 0 and audit.dropped == 0


def test_level_metadata_to_file(benchmark, tmp_path, batch):
    """Metadata, the writer thread writing the real file meanwhile (it competes for the GIL)."""
    audit = observer(tmp_path, discard=False)
    benchmark(finished_batch, audit, batch)
    audit.close()
    assert (tmp_path / "audit.log").stat().st_size > 0 and audit.dropped == 0
