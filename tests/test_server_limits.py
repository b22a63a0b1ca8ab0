"""The server's limits and lifecycle, through the real gateway process: idle connections closed,
requests waiting for a cluster's last free connection, a chunked body refused part-way, the
shutdown grace running out, and the supervisor replacing a worker that died."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.helpers import ACCESS_KEY, start_gateway
from tests.rawhttp import Client
from tests.test_proxy import AUTH, BASE, seen


def own_gateway(gateway_config, folder, *, server: dict | None = None, cluster: dict | None = None):
    """The session's gateway config with [server] and cluster "one" settings added or changed."""
    source, text = gateway_config
    for name in ("token", "key"):
        (folder / name).write_text((source / name).read_text())
    text = text.replace("        max_body_bytes = 100000000\n", _lines({"max_body_bytes": 100000000, **(server or {})}))
    text = text.replace("        response_header_timeout = 3\n", _lines({"response_header_timeout": 3, **(cluster or {})}))
    return start_gateway(text, folder)


def _lines(settings: dict) -> str:
    return "".join(f"        {key} = {value}\n" for key, value in settings.items())


@pytest.fixture(scope="module")
def limited(gateway_config, tmp_path_factory):
    """Idle client connections closed after 1 s, one connection to cluster "one", 100 kB bodies."""
    process = own_gateway(gateway_config, tmp_path_factory.mktemp("limited"),
                          server={"idle_timeout": 1, "max_body_bytes": 100000}, cluster={"max_connections": 1})
    yield process
    process.stop()


def test_an_idle_client_connection_is_closed_after_idle_timeout(limited, tls_files):
    # Kept alive after its response, the connection is closed by idle_timeout (1 s; by default
    # 120 s), well within the socket's 10 s wait.
    conn = Client(limited.port, tls_files["ca"], timeout=10)
    conn.request("GET", f"{BASE}/echo", AUTH)
    assert conn.response().keep_alive
    assert conn.closed_by_peer()
    conn.close()


def test_requests_wait_for_the_clusters_only_connection_and_then_reuse_it(limited, tls_files):
    first = Client(limited.port, tls_files["ca"], timeout=20)
    first.request("GET", f"{BASE}/echo", AUTH)
    pooled = seen(first.response())["conn"]
    slow, waiting = Client(limited.port, tls_files["ca"], timeout=20), Client(limited.port, tls_files["ca"], timeout=20)
    slow.request("GET", f"{BASE}/slow?delay=2", AUTH)  # takes the one connection...
    time.sleep(1)
    waiting.request("GET", f"{BASE}/echo", AUTH)       # ...so this one queues for it
    assert seen(waiting.response())["conn"] == pooled  # max_connections = 1: no second connection
    assert slow.response().status == 200
    for conn in (first, slow, waiting):
        conn.close()


def test_a_chunked_body_passing_max_body_bytes_part_way_is_413(limited, tls_files):
    conn = Client(limited.port, tls_files["ca"], timeout=10)
    conn.send(f"POST {BASE}/echo HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ACCESS_KEY}\r\n"
              "Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"%x\r\n%s\r\n" % (30000, b"c" * 30000)
    try:
        for _ in range(4):  # the fourth chunk passes 100 kB
            conn.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused while the last bytes were on their way
    response = conn.response()
    assert response.status == 413 and response.json()["message"] == "request body larger than 100000 bytes"
    assert conn.closed_by_peer()
    conn.close()


def test_requests_still_in_flight_when_shutdown_grace_runs_out_are_cut_off(gateway_config, tls_files, tmp_path):
    gateway = own_gateway(gateway_config, tmp_path, server={"shutdown_grace": 1}, cluster={"response_header_timeout": 60})
    try:
        busy = Client(gateway.port, tls_files["ca"], timeout=30)
        busy.request("GET", f"{BASE}/slow?delay=20", AUTH)
        time.sleep(1)  # the request is with the cluster
        gateway.popen.send_signal(signal.SIGTERM)
        assert gateway.popen.wait(timeout=15) == 0  # long before the cluster would answer
        assert busy.closed_by_peer() and not busy.responses
        busy.close()
    finally:
        gateway.stop()


def workers_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(child) for child in f.read().split()}


def test_the_supervisor_replaces_a_worker_that_died(gateway_config, tls_files, tmp_path):
    gateway = own_gateway(gateway_config, tmp_path, server={"workers": 2})
    try:
        deadline = time.monotonic() + 15
        while len(workers_of(gateway.popen.pid)) < 2:
            assert time.monotonic() < deadline, "two workers did not start"
            time.sleep(0.1)
        before = workers_of(gateway.popen.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        while (after := workers_of(gateway.popen.pid)) == before or len(after) < 2:
            assert time.monotonic() < deadline + 15, f"no worker replaced {victim}: {after}"
            time.sleep(0.1)
        assert victim not in after and len(after - before) == 1
        assert f"worker {victim} exited (status -9); starting another" in gateway.log.read_text()
        for _ in range(4):  # new connections, spread over both workers, are all served
            conn = Client(gateway.port, tls_files["ca"])
            conn.request("GET", f"{BASE}/echo", AUTH)
            assert conn.response().status == 200
            conn.close()
        assert gateway.popen.poll() is None
    finally:
        gateway.stop()
