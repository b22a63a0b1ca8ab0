"""The status page's pure parts: rate and denial rings, their merging across workers, the JSON rows."""
from __future__ import annotations

from types import SimpleNamespace

from fastproxy.management.probe import UNKNOWN, ClusterHealth
from fastproxy.store import NamespaceActivity
from fastproxy.ui.rings import (
    DenialRing,
    RateRing,
    cluster_rows,
    merge_denials,
    merge_rates,
    recent_namespaces,
    request_totals,
)


def test_a_rate_ring_keeps_per_second_counts_from_cumulative_counters():
    ring = RateRing(window=3)
    ring.sample(100, 50, 1)  # where counting starts: no sample
    ring.sample(101, 60, 1)
    ring.sample(101, 65, 3)  # a second tick within the same second adds to it
    ring.sample(102, 65, 3)
    ring.sample(103, 70, 3)
    ring.sample(104, 71, 4)
    assert list(ring.samples) == [(102, 0, 0), (103, 5, 0), (104, 1, 1)]  # bounded: the oldest left


def test_a_counter_that_goes_down_never_charts_a_negative_rate():
    ring = RateRing()
    ring.sample(1, 100, 10)
    ring.sample(2, 40, 2)
    ring.sample(3, 45, 2)
    assert list(ring.samples) == [(2, 0, 0), (3, 5, 0)]


def test_merged_rates_add_the_workers_up_per_bucket_and_drop_what_is_outside_the_window():
    worker_a = [(91, 10, 0), (95, 10, 5), (100, 20, 0), (60, 999, 999)]
    worker_b = [[100, 10, 10]]  # as read back from a worker's JSON file
    merged = merge_rates([worker_a, worker_b], now=100, window=20, bucket=10)
    # Points: seconds 81-90 and 91-100.
    assert merged == {"bucketSeconds": 10, "end": 100, "requests": [0.0, 5.0], "errors": [0.0, 1.5]}


def test_denials_are_the_newest_of_all_workers_newest_first_and_bounded():
    one, two = DenialRing(kept=2), DenialRing(kept=2)
    one.add(1.0, 401, "", "GET", "/a", "c", "10.0.0.1", "Unauthorized: invalid access key")
    one.add(3.0, 403, "jane", "GET", "/b", "c", "10.0.0.1", "forbidden")
    one.add(5.0, 401, "", "GET", "/c", "c", "10.0.0.1", "Unauthorized")
    two.add(4.0, 403, "bob", "DELETE", "/d", "", "10.0.0.2", "forbidden")
    assert [d["path"] for d in one.entries] == ["/b", "/c"]
    assert [d["path"] for d in merge_denials([one.entries, two.entries], kept=3)] == ["/c", "/d", "/b"]


def test_cluster_rows_show_latency_only_when_ready_and_gauges_only_with_metrics():
    health = {"b": ClusterHealth("Unreachable", checked=5.0, message="connection refused"),
              "a": ClusterHealth("Ready", "v1.32.0", 0.0123, 7.0), "c": UNKNOWN}
    rows = cluster_rows(health, {"a": 3}, {"b": 1})
    assert [row["name"] for row in rows] == ["a", "b", "c"]
    assert rows[0] == {"name": "a", "phase": "Ready", "version": "v1.32.0", "latencyMs": 12.3, "checked": 7.0,
                       "message": "", "watches": 3, "tunnels": 0}
    assert rows[1]["latencyMs"] is None and rows[1]["message"] == "connection refused" and rows[1]["tunnels"] == 1
    assert rows[2]["checked"] is None
    assert cluster_rows(health, None, None)[0]["watches"] is None


def test_recent_namespaces_are_the_latest_first():
    activities = [NamespaceActivity("c", f"ns{i}", float(i), subject="u", verb="get", resource="pods",
                                    subresource="log" if i == 3 else "") for i in range(5)]
    shown = recent_namespaces(activities, shown=2)
    assert [n["namespace"] for n in shown] == ["ns4", "ns3"]
    assert shown[1]["resource"] == "pods/log" and shown[1]["lastActivity"] == 3


def test_request_totals_count_every_code_and_the_5xx_as_errors():
    # Records as the metrics keep them: counts from index 2 on (here), whatever comes before.
    series = [{200: [9, 9, 3, 4], 503: [9, 9, 1, 1]}, {0: [9, 9, 2, 0], 401: [9, 9, 0, 1]}]
    assert request_totals(series, 2) == (12, 2)


def test_a_ring_survives_json_and_merges_the_same(tmp_path):
    import orjson
    ring = RateRing()
    for second, total in ((10, 0), (11, 4), (12, 9)):
        ring.sample(second, total, 0)
    back = orjson.loads(orjson.dumps(list(ring.samples)))
    assert merge_rates([back], now=12, window=10, bucket=5) == merge_rates([ring.samples], now=12, window=10, bucket=5)


def test_namespaces_accept_any_object_with_the_fields():
    item = SimpleNamespace(cluster="c", namespace="n", last_activity=1.5, subject="", verb="", resource="",
                           subresource="", virtual_cluster="vc")
    assert recent_namespaces([item])[0]["virtualCluster"] == "vc"
