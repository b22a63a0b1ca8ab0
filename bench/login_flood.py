"""Do password logins slow down proxied requests? Proxied GET latency, idle and under a flood of logins.

    .venv/bin/python -m bench.login_flood [--clients 8] [--requests 300]

Starts the simulated cluster and `fastproxy serve` (one worker, TLS, a user with a password) in a
temporary folder, measures proxied GETs of a namespace's pods one after another (10 ms apart),
then again while `--clients` connections send wrong-password logins back to back (each from a
loopback address of its own, with the back-off out of reach), and prints both with their ratio.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from devcluster.process import start_devcluster
from fastproxy.demo import CLUSTER, VIEWER_RULES, prepare

PODS = f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces/team-a/pods"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fastproxy(*args: str, stdin: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "fastproxy", *args], input=stdin, text=True, check=True, capture_output=True)


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the gateway did not start")


def proxied(port: int, context: ssl.SSLContext, key: str, count: int) -> list[float]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
    spent = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("GET", PODS, headers={"Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        spent.append(time.perf_counter() - started)
        time.sleep(0.01)
    connection.close()
    return spent


def flood(port: int, context: ssl.SSLContext, source: str, stop: threading.Event, answers: list[int]) -> None:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, source_address=(source, 0))
    while not stop.is_set():
        connection.request("POST", "/auth/password/login", body=json.dumps({"username": "alice", "password": "wrong"}))
        response = connection.getresponse()
        response.read()
        answers.append(response.status)
    connection.close()


def percentiles(spent: list[float]) -> tuple[float, float]:
    ordered = sorted(spent)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.99) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="login-flood-"))
    cluster = start_devcluster(folder / "cluster", rules=VIEWER_RULES)
    port = free_port()
    config = prepare(folder, cluster.url, cluster.ca_file, cluster.gateway_token_file, f"127.0.0.1:{port}")
    config.write_text(config.read_text() + "\n[login]\nfree_failures = 1000000\n")
    fastproxy("user", "create", "alice", "--config", str(config))
    fastproxy("user", "set-password", "alice", "--config", str(config), stdin="alice-password-1\n")
    with open(folder / "gateway.log", "w") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "fastproxy", "serve", "--config", str(config)], stderr=log)
    try:
        wait_listening(port)
        context = ssl.create_default_context(cafile=str(folder / "gateway-tls" / "ca.crt"))
        key = (folder / "admin.key").read_text().strip()
        proxied(port, context, key, 50)  # warm up
        idle = percentiles(proxied(port, context, key, args.requests))
        stop, answers = threading.Event(), []
        clients = [threading.Thread(target=flood, args=(port, context, f"127.0.9.{i + 1}", stop, answers))
                   for i in range(args.clients)]
        for client in clients:
            client.start()
        time.sleep(1)
        started, before = time.monotonic(), len(answers)
        loaded = percentiles(proxied(port, context, key, args.requests))
        rate = (len(answers) - before) / (time.monotonic() - started)
        stop.set()
        for client in clients:
            client.join()
        assert set(answers) == {401}, set(answers)
        print(f"proxied GET, idle:                         p50 {idle[0]:.2f} ms  p99 {idle[1]:.2f} ms")
        print(f"proxied GET, {args.clients} clients flooding logins: p50 {loaded[0]:.2f} ms  p99 {loaded[1]:.2f} ms"
              f"  ({rate:.1f} logins/s answered)")
        print(f"flood / idle: p50 {loaded[0] / idle[0]:.2f}x  p99 {loaded[1] / idle[1]:.2f}x")
    finally:
        gateway.terminate()
        gateway.wait(15)
        cluster.stop()


if __name__ == "__main__":
    main()
