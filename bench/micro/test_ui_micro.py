"""What the status page's observer of denials adds per request: the observers the gateway runs
with metrics alone, against metrics plus the page's `Denials` (one comparison unless the request
was refused), on the same finished small GETs (200s; and all refused, its worst case).

Each round observes 1,000 finished contexts; the time of a round in ms is the µs per request.

Run: .venv/bin/pytest bench/micro/test_ui_micro.py --benchmark-enable
"""
from __future__ import annotations

import pytest

from bench.micro.test_metrics_micro import BATCH, clusters, contexts  # noqa: F401  (clusters: a fixture)
from fastproxy.context import Observers
from fastproxy.observe.metrics import Metrics
from fastproxy.ui.page import Denials


def observed(observers: Observers, status: int):
    (_, batch), _ = contexts(None, new_objects=False)
    for ctx in batch:
        ctx.status = status
    return (observers, batch), {}


def observe(observers: Observers, batch) -> None:
    """As the connection drives the observers, then the flush the gateway makes every 100 ms."""
    for ctx in batch:
        observers.start(ctx)
        observers.finish(ctx)
    observers.flush()


@pytest.mark.parametrize("with_page", [False, True], ids=["metrics", "metrics+denials"])
@pytest.mark.parametrize("status", [200, 403])
def test_observers(benchmark, clusters, with_page, status):  # noqa: F811
    config, registry = clusters
    metrics = Metrics(config, registry, None)
    observers = Observers([metrics, Denials()] if with_page else [metrics])
    benchmark.pedantic(observe, setup=lambda: observed(observers, status), rounds=200, warmup_rounds=5)
    benchmark.extra_info["requests_per_round"] = BATCH
