"""The three workloads, each measured against one started target.

Each returns a flat dict of metrics plus the CPU readings of its measured window. Load generators
run on the load CPU; the proxy's own CPU time over the window turns work into per-core figures.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .measure import Window, rss_bytes
from .processes import LOAD_CPU, PROXY_CPU
from .targets import MANAGEMENT_USER, MANAGEMENT_USERS, Endpoint, Setup
from .upstream import LIST_PATH, SMALL_PATH, WATCH_PATH, WATCH_SAME_PATH

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    """Durations and sizes: the full plan or the --quick smoke plan."""

    get_warmup_s: float
    get_duration_s: float
    list_fetches: int
    watch_streams: tuple[int, ...]
    watch_warmup_s: float
    watch_window_s: float
    watch_same: tuple[tuple[int, int], ...] = ()  # (clients, resources)
    round_s: float = 1  # one window of a paired round (the small GET and management cases)


FULL_PLAN = Plan(2, 10, 10, (100, 1_000, 10_000), 2, 10, ((1_000, 1), (9_000, 1), (9_000, 100)), round_s=3)
QUICK_PLAN = Plan(1, 2, 3, (100, 1_000), 1, 2, ((100, 1), (1_000, 1), (1_000, 10)))


class WorkloadFailed(Exception):
    pass


def _pinned(argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(LOAD_CPU), *argv]


def _window(endpoint: Endpoint) -> Window:
    return Window(endpoint.process.pid if endpoint.process else None, LOAD_CPU, PROXY_CPU)


WRK_DURATION_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(output: str) -> dict:
    def latency_ms(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
        return float(value) * WRK_DURATION_UNITS[unit]

    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests": requests,
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "latency_p50_ms": latency_ms("50"),
        "latency_p99_ms": latency_ms("99"),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(int(count) for count in socket_errors.groups()) if socket_errors else 0),
    }


def _wrk(endpoint: Endpoint, duration_s: float, url: str | None = None, script: Path | None = None) -> dict:
    headers = [arg for name, value in endpoint.headers.items() for arg in ("-H", f"{name}: {value}")]
    extra = ["-s", str(script)] if script else []
    argv = _pinned(["wrk", "-c", "64", "-t", "1", "-d", f"{duration_s:g}s", "--latency", *headers, *extra,
                    url or endpoint.base_url + SMALL_PATH])
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode != 0 or "requests in" not in run.stdout:
        raise WorkloadFailed(f"wrk failed: {run.stderr.strip() or run.stdout.strip()}")
    return parse_wrk(run.stdout)


def small_get(endpoint: Endpoint, plan: Plan, _setup: Setup) -> dict:
    if plan.get_warmup_s:  # fills connection pools; not counted (paired rounds warm up once)
        _wrk(endpoint, plan.get_warmup_s)
    with _window(endpoint) as window:
        result = _wrk(endpoint, plan.get_duration_s)
    measured = window.summary()
    per_cpu_second = result["requests"] / measured["proxy_cpu_s"] if measured["proxy_cpu_s"] else None
    return {**result, "requests_per_cpu_s": per_cpu_second, "window": measured}


def _management_url(endpoint: Endpoint, rest: str) -> str:
    root = endpoint.base_url.split("/kubernetes/", 1)[0]
    return f"{root}/kubernetes/management/apis/management.loft.sh/v1/{rest}"


def _requests_per_cpu(endpoint: Endpoint, plan: Plan, url: str, script: Path | None = None) -> dict:
    if plan.get_warmup_s:
        _wrk(endpoint, plan.get_warmup_s, url, script)
    with _window(endpoint) as window:
        result = _wrk(endpoint, plan.get_duration_s, url, script)
    measured = window.summary()
    if result["errors"]:
        raise WorkloadFailed(f"{result['errors']} of {result['requests']} requests failed")
    per_cpu_second = result["requests"] / measured["proxy_cpu_s"] if measured["proxy_cpu_s"] else None
    return {**result, "requests_per_cpu_s": per_cpu_second, "window": measured}


def management_get(endpoint: Endpoint, plan: Plan, setup: Setup) -> dict:
    """GET one user of the 10,000: answered from the worker's snapshot."""
    return _requests_per_cpu(endpoint, plan, _management_url(endpoint, f"users/{MANAGEMENT_USER}"))


def management_self(endpoint: Endpoint, plan: Plan, setup: Setup) -> dict:
    """POST a Self: authentication, the caller's identity and a JSON answer, no store write."""
    script = setup.workdir / "create-self.lua"
    script.write_text('wrk.method = "POST"\nwrk.body = \'{"apiVersion":"management.loft.sh/v1","kind":"Self"}\'\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    return _requests_per_cpu(endpoint, plan, _management_url(endpoint, "selves"), script)


def management_list(endpoint: Endpoint, plan: Plan, setup: Setup) -> dict:
    """LIST all 10,000 users, one request at a time, as a controller's relist would."""
    headers = [arg for name, value in endpoint.headers.items() for arg in ("-H", f"{name}: {value}")]
    argv = _pinned(["curl", "-sS", "--http1.1", "--cacert", str(setup.tls.ca),
                    "-w", "%{http_code} %{size_download} %{time_total}\n", *headers])
    url = _management_url(endpoint, "users")
    fetches = plan.list_fetches * 5

    def run(count: int) -> list[tuple[int, int, float]]:
        # One curl, one connection, `count` LISTs in a row; -o applies to the URL before it.
        done = subprocess.run(argv + [url, "-o", "/dev/null"] * count, capture_output=True, text=True)
        if done.returncode != 0:
            raise WorkloadFailed(f"curl failed: {done.stderr.strip()}")
        rows = [line.split() for line in done.stdout.splitlines()]
        return [(int(code), int(size), float(seconds)) for code, size, seconds in rows]

    run(1)
    with _window(endpoint) as window:
        started = time.monotonic()
        results = run(fetches)
        elapsed = time.monotonic() - started
    measured = window.summary()
    if any(code != 200 or size < MANAGEMENT_USERS * 200 for code, size, _ in results):
        raise WorkloadFailed(f"LIST answers are not the {MANAGEMENT_USERS} users: {results[:3]}")
    seconds = sorted(seconds for *_, seconds in results)
    return {
        "requests": len(results),
        "requests_per_s": len(results) / elapsed,
        "latency_p50_ms": seconds[len(seconds) // 2] * 1e3,
        "latency_p99_ms": seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1e3,
        "errors": 0,
        "requests_per_cpu_s": len(results) / measured["proxy_cpu_s"] if measured["proxy_cpu_s"] else None,
        "window": measured,
    }


def _curl_list(endpoint: Endpoint, cafile: Path) -> tuple[int, int, float]:
    """(HTTP status, decoded body bytes, seconds) of one LIST, over HTTP/1.1 like every other client here."""
    headers = [arg for name, value in endpoint.headers.items() for arg in ("-H", f"{name}: {value}")]
    argv = _pinned(["curl", "-sS", "--http1.1", "--cacert", str(cafile), "-o", "/dev/null",
                    "-w", "%{http_code} %{size_download} %{time_total}", *headers, endpoint.base_url + LIST_PATH])
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode != 0:
        raise WorkloadFailed(f"curl failed: {run.stderr.strip()}")
    status, size, seconds = run.stdout.split()
    return int(status), int(size), float(seconds)


def chunked_list(endpoint: Endpoint, plan: Plan, setup: Setup) -> dict:
    _curl_list(endpoint, setup.tls.ca)
    fetches = []
    with _window(endpoint) as window:
        for _ in range(plan.list_fetches):
            fetches.append(_curl_list(endpoint, setup.tls.ca))
    measured = window.summary()
    expected_bytes = setup.upstream.list_bytes
    wrong = [(status, size) for status, size, _ in fetches if status != 200 or size != expected_bytes]
    if wrong:
        raise WorkloadFailed(f"LIST answers differ from the upstream's {expected_bytes} bytes: {wrong}")
    total_bytes = sum(size for _, size, _ in fetches)
    return {
        "fetches": len(fetches),
        "mb_per_s": total_bytes / sum(seconds for *_, seconds in fetches) / 1e6,
        "cpu_s_per_gb": measured["proxy_cpu_s"] / (total_bytes / 1e9) if endpoint.process else None,
        "window": measured,
    }


def _watch(endpoint: Endpoint, plan: Plan, setup: Setup, streams: int, path: str, resources: int = 1) -> dict:
    """N watch streams through the target over one measured window (watch_client.py)."""
    pid = endpoint.process.pid if endpoint.process else None
    idle_rss = rss_bytes(pid) if pid else 0
    argv = _pinned([sys.executable, "-m", "bench.watch_client", "--url", endpoint.base_url + path,
                    "--streams", str(streams), "--resources", str(resources), "--cafile", str(setup.tls.ca),
                    *[arg for name, value in endpoint.headers.items() for arg in ("--header", f"{name}: {value}")]])
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        connected = json.loads(client.stdout.readline() or "{}")
        if connected.get("streams") != streams:
            raise WorkloadFailed(f"only {connected.get('streams')} of {streams} watches opened: {connected}")
        time.sleep(plan.watch_warmup_s)
        with _window(endpoint) as window:
            client.stdin.write("start\n")
            client.stdin.flush()
            time.sleep(plan.watch_window_s)
            loaded_rss = rss_bytes(pid) if pid else 0
            client.stdin.write("stop\n")
            client.stdin.flush()
        stats = json.loads(client.stdout.readline())
    finally:
        client.stdin.close()
        try:
            client.wait(timeout=60)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
    measured = window.summary()
    if stats["streams_lost"]:
        raise WorkloadFailed(f"{stats['streams_lost']} of {streams} watches closed during the window")
    return {
        "streams": streams,
        "setup_s": connected["setup_s"],
        "events": stats["events"],
        "events_per_s": stats["events_per_s"],
        "missed": stats["missed"],
        "latency_p50_ms": stats["latency_p50_ms"],
        "latency_p99_ms": stats["latency_p99_ms"],
        "latency_max_ms": stats["latency_max_ms"],
        "cpu_us_per_event": measured["proxy_cpu_s"] / stats["events"] * 1e6 if pid and stats["events"] else None,
        "kib_per_watch": (loaded_rss - idle_rss) / streams / 1024 if pid else None,
        "window": measured,
    }


def watch_fanout(endpoint: Endpoint, plan: Plan, setup: Setup, streams: int) -> dict:
    """N watches of N streams the upstream tells apart: the proxy relays every one."""
    return _watch(endpoint, plan, setup, streams, WATCH_PATH)


def watch_same(endpoint: Endpoint, plan: Plan, setup: Setup, streams: int, resources: int = 1) -> dict:
    """N clients watching `resources` resources alike, at the offered total rate; how many upstream streams."""
    setup.upstream.watch_same_streams(0)  # start the count afresh
    per_resource = setup.upstream.watch_events_per_second / streams  # each client of a resource gets them all
    try:
        setup.upstream.watch_same_streams(per_resource)
        metrics = _watch(endpoint, plan, setup, streams, WATCH_SAME_PATH, resources)
    finally:
        opened = setup.upstream.watch_same_streams(0)
    if metrics["missed"]:
        raise WorkloadFailed(f"{metrics['missed']} events missed by some of the {streams} clients")
    return {**metrics, "resources": resources, "upstream_streams": opened}
