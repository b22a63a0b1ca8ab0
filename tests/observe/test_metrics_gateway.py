"""/metrics on a running gateway: what requests, watches, pools and refusals show; who may
scrape; promtool's check of a real scrape; a real Prometheus scraping the gateway over HTTPS;
and `workers = 2`, where every scrape shows the sum over both workers."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastproxy.observe.metrics import DURATION_AT
from fastproxy.routing import UI
from tests.helpers import ACCESS_KEY, start_gateway
from tests.inprocess import InProcessGateway
from tests.rawhttp import Client

BASE = "/kubernetes/cluster/one"
AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}  # alice: groups dev, ops
ADMIN_KEY = "metrics-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ADMIN_KEY_TOML = """
    [[access_keys]]
    name = "scraper"
    key_file = "admin.key"
    user = "prometheus"
    groups = ["loft:admins"]
"""


def tool(name: str) -> str:
    """A program the test needs; missing, the test fails saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with Debian's prometheus package "
                    "(apt-get install prometheus; scripts/test installs it)")
    return path


def gateway_text(gateway_config, tmp_path, extra: str = "") -> tuple:
    """The suite's gateway configuration in a folder of its own, with an admin key that may scrape."""
    folder, text = gateway_config
    for name in ("token", "key"):
        (tmp_path / name).write_text((folder / name).read_text())
    (tmp_path / "admin.key").write_text(ADMIN_KEY + "\n")
    return tmp_path, textwrap.dedent(text) + textwrap.dedent(ADMIN_KEY_TOML) + textwrap.dedent(extra)


def parse(body: bytes) -> dict[tuple, float]:
    """(sample name, sorted label pairs...) -> value."""
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


def requests(samples: dict, **labels) -> float:
    """fastproxy_requests_total added up over the series matching `labels`."""
    return sum(value for key, value in samples.items() if key[0] == "fastproxy_requests_total"
               and all((name, str(want)) in key[1:] for name, want in labels.items()))


def scrape(port: int, ca, headers=ADMIN) -> dict:
    client = Client(port, ca)
    try:
        client.request("GET", "/metrics", headers)
        response = client.response()
    finally:
        client.close()
    assert response.status == 200, response.body
    assert response.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.body)


def get(client: Client, path: str, headers=AUTH, status: int = 200):
    client.request("GET", path, headers)
    response = client.response()
    assert response.status == status, response.body
    return response


def eventually(check, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# --- in process ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inproc(gateway_config, tmp_path_factory):
    folder, text = gateway_text(gateway_config, tmp_path_factory.mktemp("metrics-inproc"))
    server = InProcessGateway(text, folder)
    yield server
    server.stop()


@pytest.fixture
def client(inproc, tls_files):
    c = Client(inproc.port, tls_files["ca"])
    yield c
    c.close()


def test_scraping_takes_an_admin_key(inproc, client):
    for headers, code, message in (({}, 401, "Unauthorized: a bearer access key is required"),
                                   ({"Authorization": "Bearer wrong"}, 401, "Unauthorized: invalid access key"),
                                   (AUTH, 403, 'forbidden: User "alice" cannot get path "/metrics"')):
        status = get(client, "/metrics", headers, code).json()
        assert (status["kind"], status["code"], status["message"]) == ("Status", code, message)
    client.request("POST", "/metrics", ADMIN)
    assert client.response().status == 405
    assert get(client, "/metrics/", ADMIN, 404).json()["kind"] == "Status"
    assert b"# TYPE fastproxy_requests_total counter" in get(client, "/metrics", ADMIN).body


def test_requests_are_counted_by_endpoint_cluster_verb_and_code(inproc, client, tls_files):
    before = scrape(inproc.port, tls_files["ca"])
    get(client, f"{BASE}/api/v1/namespaces/dev/configmaps/web")
    get(client, f"{BASE}/api/v1/namespaces/dev/configmaps")
    get(client, f"{BASE}/api/v1/pods", {"Authorization": "Bearer wrong"}, 401)
    get(client, f"{BASE}/api/v1/pods", {}, 401)
    get(client, "/nowhere", AUTH, 404)
    get(client, "/kubernetes/cluster/unknown-one/api/v1/pods", AUTH, 404)
    get(client, "/healthz", {})
    after = scrape(inproc.port, tls_files["ca"])

    def more(**labels):
        return requests(after, **labels) - requests(before, **labels)
    assert more(endpoint="cluster", cluster="one", verb="get", code=200) == 1
    assert more(endpoint="cluster", cluster="one", verb="list", code=200) == 1
    assert more(endpoint="cluster", cluster="one", verb="list", code=401) == 2
    assert more(endpoint="none", cluster="", verb="", code=404) == 1
    assert more(endpoint="cluster", cluster="", verb="list", code=404) == 1  # an unknown cluster is no label
    assert more(endpoint="health", cluster="", verb="get", code=200) == 1
    assert more(endpoint="metrics", verb="get", code=200) == 1  # the scrape before
    assert not any(("cluster", "unknown-one") in key for key in after)
    for reason, count in (("invalid_key", 1), ("missing", 1), ("expired_token", 0)):
        assert (sample(after, "fastproxy_authentication_failures_total", reason=reason)
                - sample(before, "fastproxy_authentication_failures_total", reason=reason)) == count
    labels = {"endpoint": "cluster", "cluster": "one", "verb": "get"}
    for family in ("fastproxy_request_duration_seconds", "fastproxy_response_first_byte_seconds",
                   "fastproxy_response_size_bytes"):
        count = sample(after, family + "_count", **labels) - sample(before, family + "_count", **labels)
        inf = sample(after, family + "_bucket", le="+Inf", **labels) - sample(before, family + "_bucket", le="+Inf", **labels)
        assert count == inf == 1, family
    assert sample(after, "fastproxy_response_size_bytes_sum", **labels) > 100
    assert (sample(after, "fastproxy_response_first_byte_seconds_sum", **labels)
            <= sample(after, "fastproxy_request_duration_seconds_sum", **labels))
    assert sample(after, "fastproxy_sent_bytes_total", endpoint="cluster", cluster="one") > 0


def test_gauges_go_up_and_back_down(inproc, tls_files):
    ca = tls_files["ca"]
    slow, watcher = Client(inproc.port, ca), Client(inproc.port, ca)
    try:
        slow.request("GET", f"{BASE}/api/v1/namespaces/dev/configmaps/slow?delay=1.5", AUTH)
        watcher.request("GET", f"{BASE}/api/v1/namespaces/dev/pods?watch=1&interval=0.05&serve=watch", AUTH)
        watch = watcher.head()
        watcher.feed_until(lambda: len(watch.chunks) >= 2, "events")
        during = eventually(lambda: (lambda s: s if sample(s, "fastproxy_requests_in_flight") == 2 else None)(
            scrape(inproc.port, ca)), "the slow GET and the scrape in flight")
        assert sample(during, "fastproxy_watches_open", cluster="one") == 1
        assert sample(during, "fastproxy_upstream_connections", cluster="one", state="busy") >= 2
        watcher.close()
        assert slow.response().status == 200
        after = eventually(lambda: (lambda s: s if sample(s, "fastproxy_watches_open", cluster="one") == 0 else None)(
            scrape(inproc.port, ca)), "the watch closed")
        assert sample(after, "fastproxy_requests_in_flight") == 1  # the scrape itself
        assert sample(after, "fastproxy_long_running_request_duration_seconds_count",
                      endpoint="cluster", cluster="one", verb="watch") >= 1
        assert sample(after, "fastproxy_upstream_connections", cluster="one", state="idle") >= 1
    finally:
        slow.close()
        watcher.close()


def test_pools_count_dials_failures_and_resumed_sessions(inproc, client, tls_files):
    before = scrape(inproc.port, tls_files["ca"])
    pool = inproc.gateway.clusters.get("one").pool
    get(client, f"{BASE}/echo")  # the pool learns a TLS session from a connection it opened
    inproc.call(pool.close)  # no idle connection left: the next request dials, offering the session
    assert get(client, f"{BASE}/echo").json()["tls_resumed"] is True
    get(client, "/kubernetes/cluster/down/api/v1/pods", AUTH, 503)
    after = scrape(inproc.port, tls_files["ca"])

    def more(name, cluster):
        return sample(after, name, cluster=cluster) - sample(before, name, cluster=cluster)
    assert more("fastproxy_upstream_tls_resumptions_total", "one") >= 1
    assert more("fastproxy_upstream_dials_total", "one") >= 1
    assert more("fastproxy_upstream_dial_failures_total", "down") >= 1
    assert more("fastproxy_upstream_dial_failures_total", "one") == 0


def test_impersonation_reviews_are_counted(inproc, client, tls_files):
    before = scrape(inproc.port, tls_files["ca"])
    for user, code in (("allowed-bob", 200), ("bob", 403), ("sar-fails", 403)):
        get(client, f"{BASE}/api/v1/pods", {**AUTH, "Impersonate-User": user}, code)
    after = scrape(inproc.port, tls_files["ca"])
    for outcome in ("allowed", "refused", "failed"):
        assert (sample(after, "fastproxy_impersonation_reviews_total", outcome=outcome)
                - sample(before, "fastproxy_impersonation_reviews_total", outcome=outcome)) == 1, outcome


def test_promtool_passes_a_real_scrape(inproc, client):
    get(client, f"{BASE}/api/v1/namespaces/dev/configmaps/web")
    get(client, f"{BASE}/api/v1/pods", {}, 401)
    body = get(client, "/metrics", ADMIN).body
    checked = subprocess.run([tool("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


def test_disabled_metrics_cost_nothing(gateway_config, tmp_path, tls_files):
    # The access log and the status page observe requests too; off, nothing observes requests.
    folder, text = gateway_text(gateway_config, tmp_path,
                                "[metrics]\nenabled = false\n[access_log]\nenabled = false\n[ui]\nenabled = false\n")
    server = InProcessGateway(text, folder)
    try:
        assert server.gateway.metrics is None and server.gateway.observers.active is False
        assert server.gateway.request_ids is None
        client = Client(server.port, tls_files["ca"])
        status = get(client, "/metrics", ADMIN, 404).json()
        assert status["message"] == "metrics are disabled on this gateway ([metrics] enabled = false)"
        assert server.gateway.status_page is None and UI not in server.gateway.handlers
        status = get(client, "/ui/", ADMIN, 404).json()
        assert status["message"] == "the status page is disabled on this gateway ([ui] enabled = false)"
        client.close()
    finally:
        server.stop()


def test_open_metrics_take_no_key(gateway_config, tmp_path, tls_files):
    folder, text = gateway_text(gateway_config, tmp_path, "[metrics]\nopen = true\n")
    server = InProcessGateway(text, folder)
    try:
        assert sample(scrape(server.port, tls_files["ca"], {}), "fastproxy_workers") == 1
    finally:
        server.stop()


# --- real processes --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as answer:
        result = json.load(answer)
    assert result["status"] == "success", result
    return result["data"]["result"]


def test_prometheus_scrapes_the_gateway(gateway_config, tmp_path, tls_files):
    prometheus = tool("prometheus")
    (tmp_path / "gateway").mkdir()
    gateway = start_gateway(*reversed(gateway_text(gateway_config, tmp_path / "gateway")))
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(textwrap.dedent(f"""
        global:
          scrape_interval: 1s
          scrape_timeout: 1s
        scrape_configs:
          - job_name: fastproxy
            scheme: https
            metrics_path: /metrics
            tls_config:
              ca_file: {tls_files['ca']}
            authorization:
              credentials: {ADMIN_KEY}
            static_configs:
              - targets: ["127.0.0.1:{gateway.port}"]
    """))
    server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}",
                               "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        client = Client(gateway.port, tls_files["ca"])
        for n in range(7):
            get(client, f"{BASE}/api/v1/namespaces/dev/configmaps/c{n}")
        get(client, f"{BASE}/api/v1/pods", {}, 401)
        client.close()

        def answered():
            try:
                result = query(web, 'sum(fastproxy_requests_total{code="200",endpoint="cluster"})')
            except OSError:
                return None  # not listening yet
            return result if result and result[0]["value"][1] == "7" else None
        eventually(answered, f"Prometheus never saw the 7 requests: {(tmp_path / 'prometheus.log').read_text()}", 15)
        [everything] = query(web, 'sum(fastproxy_requests_total{code="200"})')  # the test's, and the scrapes before
        assert float(everything["value"][1]) >= 7
        [up] = query(web, 'up{job="fastproxy"}')
        assert up["value"][1] == "1"
        [failures] = query(web, 'fastproxy_authentication_failures_total{reason="missing"}')
        assert failures["value"][1] == "1"
    finally:
        server.terminate()
        server.wait(10)
        gateway.stop()


def test_two_workers_scrape_as_one(gateway_config, tmp_path, tls_files, monkeypatch):
    """Requests spread over both workers (SO_REUSEPORT, one connection each); every scrape, on
    whichever worker it lands, shows them all; a worker killed keeps its counters in the sum."""
    shares = tmp_path / "tmp"
    shares.mkdir()
    monkeypatch.setenv("TMPDIR", str(shares))  # where the gateway makes its workers' folder
    (tmp_path / "gateway").mkdir()
    folder, text = gateway_text(gateway_config, tmp_path / "gateway")
    gateway = start_gateway(text.replace("[server]\n", "[server]\nworkers = 2\n", 1), folder)
    ca = tls_files["ca"]
    try:
        [share] = eventually(lambda: glob.glob(str(shares / "fastproxy-metrics-*")), "the workers' folder")
        # A worker's file is written after its socket listens: until both are, one would take every request.
        eventually(lambda: len(glob.glob(os.path.join(share, "[0-9]*.json"))) == 2, "both workers listening")
        count = 40
        for n in range(count):
            client = Client(gateway.port, ca)
            get(client, f"{BASE}/api/v1/namespaces/dev/configmaps/c{n}")
            client.close()

        def own_counts() -> dict[int, float]:
            counts = {}
            for path in glob.glob(os.path.join(share, "[0-9]*.json")):
                state = orjson.loads(open(path, "rb").read())
                counts[int(os.path.basename(path).split(".")[0])] = sum(
                    sum(row[4 + DURATION_AT:]) for row in state["short"] if row[:2] == ["cluster", "one"])
            return counts if sum(counts.values()) == count else None
        per_worker = eventually(own_counts, "both workers' files hold the requests")
        assert len(per_worker) == 2 and all(per_worker.values()), per_worker  # both served some
        for _ in range(8):
            samples = scrape(gateway.port, ca)
            assert sample(samples, "fastproxy_workers") == 2
            assert requests(samples, endpoint="cluster", cluster="one", code=200) == count
            assert sample(samples, "fastproxy_watches_open", cluster="one") == 0
            assert sample(samples, "process_open_fds") > 0
        os.kill(next(iter(per_worker)), signal.SIGKILL)
        eventually(lambda: os.path.exists(os.path.join(share, "retired.json")), "the killed worker's counters kept")
        samples = eventually(lambda: (lambda s: s if sample(s, "fastproxy_workers") == 2 else None)(scrape(gateway.port, ca)),
                             "a new worker in place of the killed one")
        assert requests(samples, endpoint="cluster", cluster="one", code=200) == count
    finally:
        gateway.stop()
    assert not os.path.exists(share)  # the supervisor removes the folder when it stops
