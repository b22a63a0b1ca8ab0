"""Self-test of the bench harness: `.venv/bin/pytest bench/test_harness_smoke.py` (about a minute).

Not collected by the default test run (testpaths = tests). The end-to-end tests need nginx, wrk,
curl and taskset, and the haproxy ones haproxy, as scripts/bench installs them; they skip without them.
"""
from __future__ import annotations

import argparse
import http.server
import json
import shutil
import ssl
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import report, stream_server, watch_client
from bench.__main__ import run_paired
from bench.measure import Window, cpu_seconds, process_tree, rss_bytes
from bench.processes import LOAD_CPU, PROXY_CPU, Process, http_get
from bench.targets import (
    TARGETS,
    VARIANTS,
    Setup,
    baseline_targets,
    start_bare_forwarder,
    start_direct,
    start_fastproxy,
    start_haproxy,
    start_nginx_proxy,
)
from bench.upstream import SMALL_PATH, Upstream, make_tls_files, small_configmap
from bench.workloads import Plan, chunked_list, parse_wrk, small_get, watch_fanout, watch_same

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080/
  1 threads and 64 connections
  Latency Distribution
     50%  639.00us
     75%  708.00us
     90%  788.00us
     99%    1.13ms
  966593 requests in 10.00s, 1.04GB read
  Non-2xx or 3xx responses: 12
Requests/sec:  96658.19
"""


def test_parse_wrk_reads_counts_percentiles_and_errors():
    assert parse_wrk(WRK_OUTPUT) == {
        "requests": 966593,
        "requests_per_s": 96658.19,
        "latency_p50_ms": pytest.approx(0.639),
        "latency_p99_ms": pytest.approx(1.13),
        "errors": 12,
    }


def test_watch_events_are_chunks_of_json_lines_the_client_can_time():
    event = stream_server.MODIFIED.stamped()
    size, rest = event.split(b"\r\n", 1)
    line = rest[: int(size, 16)]
    assert rest[int(size, 16) :] == b"\r\n" and line.endswith(b"\n")
    assert json.loads(line)["type"] == "MODIFIED"
    tally = watch_client.Tally()
    tally.counting = True
    tally.record(line, received_ns=int(json.loads(line)["object"]["metadata"]["annotations"]
                                       ["bench.fastproxy.io/sent-ns"]) + 1500)
    assert tally.latencies_ns == [1500]


def test_process_readings_cover_this_process():
    import os

    assert os.getpid() in process_tree(os.getpid())
    assert cpu_seconds(os.getpid()) > 0 and rss_bytes(os.getpid()) > 0


def test_a_window_counts_what_else_ran_on_the_proxy_core(tmp_path: Path):
    """Two windows over the same second, one taking a busy loop on the proxy core as its proxy, one a
    sleeper: the busy loop's CPU is the proxy's in the first and foreign in the second."""
    busy = Process("busy", [sys.executable, "-c", "while True: pass"], PROXY_CPU, tmp_path)
    sleeper = Process("sleeper", ["sleep", "5"], PROXY_CPU, tmp_path)
    try:
        time.sleep(0.2)
        with Window(busy.pid, LOAD_CPU, PROXY_CPU) as as_proxy, Window(sleeper.pid, LOAD_CPU, PROXY_CPU) as beside:
            time.sleep(1)
    finally:
        busy.stop()
        sleeper.stop()
    ours, other = as_proxy.summary(), beside.summary()
    assert ours["proxy_cpu_util"] > 0.2 and other["proxy_cpu_util"] < 0.05
    assert other["foreign_proxy_core_util"] - ours["foreign_proxy_core_util"] == pytest.approx(
        ours["proxy_cpu_util"], abs=0.1)


def _cell(target: str, requests_per_s: float, cpu_s: float) -> dict:
    window = {"elapsed_s": 1.0, "proxy_cpu_s": cpu_s, "proxy_cpu_util": cpu_s, "load_cpu_util": 0.5,
              "foreign_cpu_util": 0.0, "steal_util": 0.0, "foreign_proxy_core_util": 0.0}
    metrics = {"requests": requests_per_s, "requests_per_s": requests_per_s, "latency_p50_ms": 1.0,
               "latency_p99_ms": 2.0, "errors": 0, "requests_per_cpu_s": requests_per_s / cpu_s, "window": window}
    return {"repetition": 0, "case": "get", "target": target, "metrics": metrics}


def test_report_takes_medians_and_ratios_and_draws(tmp_path: Path):
    cells = [_cell("fastproxy", rate, 1.0) for rate in (900, 1000, 5000)] + [_cell("nginx", 2000, 0.5)]
    summary = report.summarize(cells)
    assert summary["get"]["fastproxy"]["medians"]["requests_per_s"] == 1000
    assert report.ratio(summary, "get", "requests_per_s", "nginx") == 0.5
    run = {"targets": ["fastproxy", "nginx"], "started_utc": "now", "command": "scripts/bench", "repeat": 3,
           "unavailable": {}, "watch_streams_capped": None, "environment": {}, "cells": cells, "list_mb": 50,
           "watch_events_per_second_offered": 10_000}
    assert "| small GET | req/s | ↑ | 1,000 | 2,000 | 0.50× |" in report.markdown(run, summary)
    pytest.importorskip("matplotlib")
    report.chart(run, summary, tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_the_median_interval_takes_the_order_statistics_that_cover_95_percent():
    assert report.median_interval([1.0, 2, 3, 4, 5]) is None  # even (min, max) covers only 94%
    assert report.median_interval([6.0, 1, 5, 2, 4, 3]) == (1, 6)  # 97%
    assert report.median_interval([float(value) for value in range(1, 11)]) == (2, 9)  # 98%; (3, 8) only 89%


def test_paired_rounds_give_per_round_ratios_to_the_first_fastproxy_target():
    cells = []
    for round_number, (ours, nginx) in enumerate([(1000, 500), (2000, 1000), (600, 200)]):
        for target, rate in (("nginx", nginx), ("fastproxy", ours)):
            cells.append({**_cell(target, rate, 1.0), "round": round_number})
    cells[0]["metrics"]["window"]["foreign_cpu_util"] = 0.5  # a noisy window spoils its round
    result = report.paired(cells, ["nginx", "fastproxy"])["get"]
    assert result["reference"] == "fastproxy" and result["rounds"] == 3
    assert result["ratios"]["requests_per_s"]["nginx"] == {"per_round": [2.0, 2.0, 3.0], "median": 2.0,
                                                            "interval": None, "noisy_rounds": 1}
    assert result["windows"]["foreign_cpu_util_max"] == 0.5
    assert report.ratio(report.summarize(cells), "get", "requests_per_s", "nginx", {"get": result}) == 2.0


def test_a_baseline_runs_fastproxy_and_each_variant_asked_for_as_of_the_revision(tmp_path: Path):
    targets = baseline_targets("HEAD", tmp_path, ["fastproxy-bare", "bare-forwarder", "nginx", "fastproxy+audit"])
    assert [target.name for target in targets] == ["fastproxy@HEAD", "fastproxy-bare@HEAD", "fastproxy+audit@HEAD"]
    assert [target.start.keywords["extra"] for target in targets] == ["", VARIANTS["fastproxy-bare"],
                                                                        VARIANTS["fastproxy+audit"]]
    assert (tmp_path / "baseline" / "fastproxy" / "proxy.py").is_file()


NEEDS_TOOLS = pytest.mark.skipif(not all(map(shutil.which, ("nginx", "wrk", "curl", "taskset"))),
                                 reason="needs nginx, wrk, curl and taskset (scripts/bench installs them)")


def _setup(tmp_path: Path, watch_events_per_second: float) -> Setup:
    tls = make_tls_files(tmp_path)
    upstream = Upstream(tmp_path, tls, list_mb=2, watch_events_per_second=watch_events_per_second, max_open_files=1024)
    token, key = tmp_path / "token", tmp_path / "key"
    token.write_text("t\n")
    key.write_text("bench-access-key\n")
    return Setup(tmp_path, tls, upstream, token, "bench-access-key", key, 1024, None, "")


def _sharing_fastproxy(setup: Setup, client_tls: bool):
    return start_fastproxy(setup, client_tls, extra=VARIANTS["fastproxy+share"])


@NEEDS_TOOLS
@pytest.mark.parametrize(("start", "client_tls", "streams", "resources", "upstream_streams"), [
    (_sharing_fastproxy, False, 30, 1, 1),   # one upstream stream per resource, however many clients
    (_sharing_fastproxy, True, 30, 3, 3),
    (start_nginx_proxy, False, 20, 2, 20),   # a stream per client
])
def test_watch_same_counts_upstream_streams_and_every_client_gets_every_event(
        tmp_path: Path, start, client_tls: bool, streams: int, resources: int, upstream_streams: int):
    setup = _setup(tmp_path, watch_events_per_second=600)
    plan = Plan(get_warmup_s=1, get_duration_s=1, list_fetches=1, watch_streams=(), watch_warmup_s=0.3,
                watch_window_s=1)
    try:
        endpoint = start(setup, client_tls)
        try:
            watched = watch_same(endpoint, plan, setup, streams=streams, resources=resources)
        finally:
            endpoint.stop()
    finally:
        setup.upstream.stop()
    assert watched["upstream_streams"] == upstream_streams
    # every client of a resource got every event written in the window: ~600 in all over 1 s
    assert watched["missed"] == 0 and watched["events"] >= 300


@NEEDS_TOOLS
def test_every_workload_runs_through_fastproxy_nginx_the_bare_forwarder_and_direct(tmp_path: Path):
    setup = _setup(tmp_path, watch_events_per_second=500)
    upstream = setup.upstream
    plan = Plan(get_warmup_s=1, get_duration_s=1, list_fetches=1, watch_streams=(20,), watch_warmup_s=0.2,
                watch_window_s=0.5)
    try:
        for start, client_tls in ((start_direct, True), (start_nginx_proxy, False), (start_fastproxy, True),
                                  (start_bare_forwarder, False), (start_bare_forwarder, True)):
            endpoint = start(setup, client_tls)
            try:
                get = small_get(endpoint, plan, setup)
                listed = chunked_list(endpoint, plan, setup)
                watched = watch_fanout(endpoint, plan, setup, streams=20)
            finally:
                endpoint.stop()
            assert get["requests"] > 0 and get["errors"] == 0
            assert listed["mb_per_s"] > 0
            assert watched["events_per_s"] > 0 and watched["latency_p99_ms"] < 1000
        assert watched["cpu_us_per_event"] is not None and watched["kib_per_watch"] is not None
    finally:
        upstream.stop()


NEEDS_HAPROXY = pytest.mark.skipif(not all(map(shutil.which, ("haproxy", "taskset"))),
                                   reason="needs haproxy and taskset (scripts/bench and scripts/test install haproxy)")


@NEEDS_HAPROXY
def test_haproxy_sends_the_upstream_its_own_host_and_token_not_the_clients(tmp_path: Path):
    """Like nginx's config: the client's Authorization replaced by the upstream token, Host by the upstream's."""
    tls = make_tls_files(tmp_path)
    seen: list[dict[str, str]] = []  # header names lowercased: HAProxy sends them so

    class Recorder(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append({name.lower(): value for name, value in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("upstream-token\n")
    upstream = SimpleNamespace(tls_port=server.server_address[1])
    setup = Setup(tmp_path, tls, upstream, token, "", token, 1024, None, "")  # the recorder stands in for the upstream
    try:
        endpoint = start_haproxy(setup, client_tls=True)
        try:
            status, body = http_get(endpoint.base_url + "/api/v1/pods", {"Authorization": "Bearer client-key"},
                                    tls.ca)
        finally:
            endpoint.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert (status, body) == (200, b"{}")
    assert seen[-1]["authorization"] == "Bearer upstream-token"
    assert seen[-1]["host"] == f"127.0.0.1:{upstream.tls_port}"


@NEEDS_TOOLS
@NEEDS_HAPROXY
@pytest.mark.parametrize("client_tls", [False, True])
def test_haproxy_proxies_a_get_and_a_watch_to_the_upstream(tmp_path: Path, client_tls: bool):
    setup = _setup(tmp_path, watch_events_per_second=200)
    plan = Plan(get_warmup_s=1, get_duration_s=1, list_fetches=1, watch_streams=(5,), watch_warmup_s=0.2,
                watch_window_s=0.5)
    try:
        endpoint = start_haproxy(setup, client_tls)
        try:
            got = http_get(endpoint.base_url + SMALL_PATH, {}, setup.tls.ca)
            watched = watch_fanout(endpoint, plan, setup, streams=5)
        finally:
            endpoint.stop()
    finally:
        setup.upstream.stop()
    assert got == (200, small_configmap())
    # 200 events/s over 0.5 s, each to all 5 watches: ~100 events, at least half of them within a second
    assert watched["events"] >= 50 and watched["cpu_us_per_event"] is not None
    # each event sent on at once (`option http-no-delay`), not held back for a fuller packet for ~200 ms
    assert watched["latency_p99_ms"] < 100


@NEEDS_TOOLS
def test_paired_rounds_measure_targets_started_at_once_in_alternating_order(tmp_path: Path):
    setup = _setup(tmp_path, watch_events_per_second=100)
    plan = Plan(get_warmup_s=1, get_duration_s=5, list_fetches=1, watch_streams=(), watch_warmup_s=0,
                watch_window_s=0, round_s=1)
    args = argparse.Namespace(targets=[target for target in TARGETS if target.name in ("fastproxy", "nginx")],
                              rounds=2, tls=False)
    try:
        cells = run_paired(setup, args, plan, [("get", small_get)], {})
    finally:
        setup.upstream.stop()
    assert [(cell["case"], cell["round"], cell["target"]) for cell in cells] == [
        ("get", 0, "fastproxy"), ("get", 0, "nginx"), ("get", 1, "nginx"), ("get", 1, "fastproxy")]
    windows = [cell["metrics"]["window"] for cell in cells]
    assert all(0.5 < window["elapsed_s"] < 3 and window["idle_targets_cpu_util"] >= 0 for window in windows)
    ratios = report.paired(cells, ["fastproxy", "nginx"])["get"]["ratios"]["requests_per_s"]["nginx"]
    assert len(ratios["per_round"]) == 2 and ratios["median"] > 0
