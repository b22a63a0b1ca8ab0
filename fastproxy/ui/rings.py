"""The status page's bounded memories and the JSON it answers: plain data, no I/O.

`RateRing` turns cumulative request counters, sampled on the gateway's tick, into per-second
counts of the last WINDOW seconds; `DenialRing` keeps the latest refused requests. Each worker
keeps its own; `merge_rates` and `merge_denials` add the workers' up, `status_document` shapes
what the page's script draws.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

WINDOW = 300          # seconds of request history: the charts show the last five minutes
BUCKET = 10           # seconds a chart point averages over
DENIALS_KEPT = 20     # refused requests remembered per worker, and shown
NAMESPACES_SHOWN = 10
DENIED = (401, 403)   # what counts as a denial: unauthenticated, forbidden

Sample = tuple[int, int, int]  # (unix second, requests in it, errors in it)


class RateRing:
    """Per-second request and error counts, from cumulative counters sampled about once a second."""

    __slots__ = ("samples", "last")

    def __init__(self, window: int = WINDOW):
        self.samples: deque[Sample] = deque(maxlen=window)
        self.last: tuple[int, int] | None = None  # the counters at the previous sample

    def sample(self, second: int, requests: int, errors: int) -> None:
        """The counters' totals now; the first sample only sets where counting starts."""
        last, self.last = self.last, (requests, errors)
        if last is None:
            return
        # A counter never goes down; max() keeps a worker's restart from charting a negative rate.
        added = (second, max(requests - last[0], 0), max(errors - last[1], 0))
        if self.samples and self.samples[-1][0] == second:  # two ticks in one second: one sample
            before = self.samples.pop()
            added = (second, before[1] + added[1], before[2] + added[2])
        self.samples.append(added)


def merge_rates(rings: Iterable[Iterable[Sequence[int]]], now: int, window: int = WINDOW,
                bucket: int = BUCKET) -> dict[str, Any]:
    """The workers' samples added up into per-second rates, one point per `bucket` seconds of the
    `window` ending at `now` (oldest first); a second no worker sampled counts as none."""
    points = window // bucket
    first = now - points * bucket + 1  # the first second of the first point
    requests = [0] * points
    errors = [0] * points
    for ring in rings:
        for second, count, failed in ring:
            at = (second - first) // bucket
            if 0 <= at < points:
                requests[at] += count
                errors[at] += failed
    return {"bucketSeconds": bucket, "end": now,
            "requests": [round(n / bucket, 2) for n in requests],
            "errors": [round(n / bucket, 2) for n in errors]}


class DenialRing:
    """The latest requests refused with 401 or 403, as plain data (never a credential)."""

    __slots__ = ("entries",)

    def __init__(self, kept: int = DENIALS_KEPT):
        self.entries: deque[dict[str, Any]] = deque(maxlen=kept)

    def add(self, when: float, code: int, user: str, method: str, path: str, cluster: str, source: str,
            message: str) -> None:
        self.entries.append({"time": round(when, 3), "code": code, "user": user, "method": method, "path": path,
                             "cluster": cluster, "sourceIP": source, "message": message})


def merge_denials(lists: Iterable[Iterable[Mapping[str, Any]]], kept: int = DENIALS_KEPT) -> list[dict[str, Any]]:
    """The newest `kept` denials of all workers, newest first."""
    every = [dict(entry) for entries in lists for entry in entries]
    every.sort(key=lambda entry: entry["time"], reverse=True)
    return every[:kept]


def cluster_rows(health: Mapping[str, Any], watches: Mapping[str, int] | None,
                 tunnels: Mapping[str, int] | None) -> list[dict[str, Any]]:
    """One row per cluster in name order. `health`: name -> ClusterHealth-like (phase,
    kubernetes_version, latency, checked, message); the gauges are None when metrics are off."""
    rows = []
    for name in sorted(health):
        probe = health[name]
        rows.append({"name": name, "phase": probe.phase, "version": probe.kubernetes_version,
                     "latencyMs": round(probe.latency * 1000, 1) if probe.phase == "Ready" else None,
                     "checked": round(probe.checked, 3) if probe.checked else None, "message": probe.message,
                     "watches": watches.get(name, 0) if watches is not None else None,
                     "tunnels": tunnels.get(name, 0) if tunnels is not None else None})
    return rows


def recent_namespaces(activities: Iterable[Any], shown: int = NAMESPACES_SHOWN) -> list[dict[str, Any]]:
    """The most recently active namespaces (store NamespaceActivity records), newest first."""
    latest = sorted(activities, key=lambda activity: activity.last_activity, reverse=True)[:shown]
    return [{"cluster": a.cluster, "namespace": a.namespace, "lastActivity": int(a.last_activity),
             "subject": a.subject, "verb": a.verb, "resource": "/".join(filter(None, (a.resource, a.subresource))),
             "virtualCluster": a.virtual_cluster} for a in latest]


def request_totals(series: Iterable[Mapping[int, Sequence[float]]], count_from: int) -> tuple[int, int]:
    """(requests, errors) over metrics series (code -> record whose counts start at `count_from`);
    errors are the 5xx answers."""
    requests = errors = 0
    for by_code in series:
        for code, record in by_code.items():
            count = int(sum(record[count_from:]))
            requests += count
            if code >= 500:
                errors += count
    return requests, errors
