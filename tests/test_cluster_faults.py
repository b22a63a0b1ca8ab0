"""Clusters failing under the real gateway process: one dying mid-watch, one resetting mid-LIST,
and clusters that cannot be reached in three ways while the gateway goes on serving the others."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trustme

from tests.helpers import ACCESS_KEY, Process, start_gateway
from tests.rawhttp import Client
from tests.test_proxy import AUTH, BASE
from tests.test_upstream_protocol import CHUNKED_HEAD, raw

HERE = Path(__file__).parent


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int) -> int:
    """The descriptor count once the start's own (readiness probes, pooled handshakes) have closed:
    two readings 0.3 s apart that agree."""
    deadline = time.monotonic() + 10
    count = open_fds(pid)
    while True:
        time.sleep(0.3)
        again = open_fds(pid)
        if again == count or time.monotonic() > deadline:
            return again
        count = again


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("body_head", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
    CHUNKED_HEAD + b"7a120\r\n",  # one chunk of 500000 bytes announced
], ids=["length", "chunked"])
def test_a_cluster_resetting_mid_list_gives_a_truncated_response_never_a_clean_end(client_of_gateway, body_head):
    client = client_of_gateway
    # 300 kB of the body, and after a pause (the head is relayed by then) a reset.
    client.request("GET", raw(body_head, then=b"", pause=0.5) + "&pad=300000&reset=1", AUTH)
    response = client.head()
    assert response.status == 200
    assert client.closed_by_peer() and not response.complete
    assert 0 < len(response.body) <= 300000


@pytest.fixture
def client_of_gateway(gateway, tls_files):
    c = Client(gateway.port, tls_files["ca"], timeout=10)
    yield c
    c.close()


def start_upstream(tls_files) -> Process:
    popen = subprocess.Popen([sys.executable, str(HERE / "upstream_server.py"), str(tls_files["cert"]),
                              str(tls_files["key"])], stdout=subprocess.PIPE, text=True)
    return Process(popen, int(popen.stdout.readline()))


def gateway_text(tls_files, port: int, extra: str = "") -> str:
    return f"""
        [server]
        listen = "127.0.0.1:0"
        tls_cert_file = "{tls_files['cert']}"
        tls_key_file = "{tls_files['key']}"

        [[clusters]]
        name = "one"
        server = "https://127.0.0.1:{port}"
        ca_file = "{tls_files['ca']}"
        token_file = "token"
        {extra}
        [[access_keys]]
        name = "alice-key"
        key_file = "key"
        user = "alice"
    """


def own_folder(folder: Path) -> Path:
    (folder / "token").write_text("gateway-credential-for-upstream\n")
    (folder / "key").write_text(ACCESS_KEY + "\n")
    return folder


def test_a_cluster_dying_mid_watch_ends_the_stream_and_leaves_no_descriptor(tls_files, tmp_path):
    upstream = start_upstream(tls_files)
    gateway = start_gateway(gateway_text(tls_files, upstream.port), own_folder(tmp_path))
    try:
        baseline = settled_fds(gateway.popen.pid)
        watcher = Client(gateway.port, tls_files["ca"], timeout=10)
        watcher.request("GET", f"{BASE}/api/v1/watch?watch=true&interval=0.05", AUTH)
        response = watcher.head()
        watcher.feed_until(lambda: len(response.chunks) >= 2, "two events")
        assert open_fds(gateway.popen.pid) > baseline  # the client's socket (the cluster's may be a pooled one)
        upstream.popen.kill()
        upstream.popen.wait()
        assert watcher.closed_by_peer() and not response.complete  # cut off: the watch did not end cleanly
        watcher.close()
        wait_for(lambda: open_fds(gateway.popen.pid) <= baseline, 10, "the descriptors back to their baseline")
        # Nothing dead is pooled: the next request dials (and finds the cluster gone).
        refused = Client(gateway.port, tls_files["ca"], timeout=10)
        refused.request("GET", f"{BASE}/echo", AUTH)
        answer = refused.response()
        assert answer.status == 503 and "unreachable" in answer.json()["message"]
        refused.close()
    finally:
        gateway.stop()
        upstream.stop()


def test_unreachable_clusters_are_503_naming_why_while_the_others_are_served(tls_files, upstream, tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # TCP completes, TLS never does
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other_ca)
    clusters = "".join(f"""
        [[clusters]]
        name = "{name}"
        server = "https://127.0.0.1:{port}"
        ca_file = "{ca}"
        token_file = "token"
        connect_timeout = 5
    """ for name, port, ca in (("badcert", upstream.port, other_ca), ("refused", 1, tls_files["ca"]),
                               ("silent", silent.getsockname()[1], tls_files["ca"])))
    gateway = start_gateway(gateway_text(tls_files, upstream.port) + clusters, own_folder(tmp_path))
    try:
        answers: dict[str, tuple[int, str]] = {}

        def ask(name: str) -> None:
            conn = Client(gateway.port, tls_files["ca"], timeout=15)
            conn.request("GET", f"/kubernetes/cluster/{name}/api", AUTH)
            response = conn.response()
            answers[name] = (response.status, response.json().get("message", ""))
            conn.close()
        waiting = threading.Thread(target=ask, args=("silent",))
        waiting.start()
        ask("badcert")
        ask("refused")
        ask("one")  # served while the silent cluster's dial is still waiting
        assert "silent" not in answers and answers["one"][0] == 200
        waiting.join(15)
        assert answers["badcert"][0] == 503 and "certificate verify failed" in answers["badcert"][1]
        assert answers["refused"][0] == 503 and 'cluster "refused" is unreachable' in answers["refused"][1]
        assert answers["silent"] == (503, 'cluster "silent" is unreachable: timed out connecting')
    finally:
        gateway.stop()
        silent.close()


def test_a_watch_the_cluster_is_slow_to_answer_is_not_timed_out(client_of_gateway):
    # The session's cluster "one" has response_header_timeout = 3: a GET gets 504 after it
    # (test_upstream_timeout_is_504), a watch waits for the cluster however long it takes.
    client_of_gateway.request("GET", f"{BASE}/api/v1/slow?delay=5&watch=true", AUTH)
    assert client_of_gateway.response().status == 200
