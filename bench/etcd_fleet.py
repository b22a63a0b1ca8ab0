"""A large fleet on one etcd: how fast a revocation reaches every gateway, and what it costs etcd.

    .venv/bin/python -m bench.etcd_fleet [--gateways 20] [--keys 10000] [--revocations 100] [--interval 0.1]
                                         [--rate 3] [--warmup 6]

Starts one etcd member (Debian's etcd-server) and one simulated cluster (simulated-cluster/'s
devcluster) in a temporary folder, writes `--keys` access keys of 100 users, then starts
`--gateways` real `fastproxy serve` processes one after another (plain HTTP on 127.0.0.1,
`workers = 1` to fit a small machine, `[state] backend = "etcd"`, the devcluster as their cluster).

Traffic: a separate process sends each gateway `--rate` requests a second (`GET /version` of the
cluster) with random keys, over one kept-alive connection per gateway; so every gateway records
activity and writes it in batches, as a fleet's gateways do, and the activity comes back to every
gateway as watch events. The first revocation comes `--warmup` seconds after the traffic starts, so
that the window holds the gateways' activity flushes (every 5 s) from its start.

How propagation is measured: the revoked keys belong to one more user, `observer`, which holds one
key more that is never revoked. Before the revocations start, the bench opens a management API
watch of `ownedaccesskeys` on every gateway with that key. The management API is a subscriber of
the worker's state reader, called in the same publish as the authenticator's, so the DELETED event
of a key leaves the gateway once its worker refuses the key. Propagation is the time from the
revocation's request (EtcdStore.revoke_access_key, what the CLI and the management API call) to
the DELETED event read from each gateway's stream: what a client sees, event by event, with no
polling interval to round it. Two checks that the event means refusal: the traffic process counts
the requests sent with a revoked key after its gateway reported the key gone that were not answered
401, and at the end every revoked key is tried once on every gateway.

Revocations come every `--interval` seconds on a fixed clock (a slow one does not delay the next;
how late each was committed against its slot, and how long its commit took, are printed). Printed
too: propagation p50/p99/max over every (revocation, gateway), etcd's CPU over the window, its
write rate (revisions per second) split into revocations and activity, and the gateways' CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

from bench.processes import free_port
from devcluster import start_devcluster
from fastproxy.store.base import AccessKey, User, key_digest
from fastproxy.store.etcd import ACCESS_KEYS, USERS, EtcdStore
from fastproxy.store.etcd_client import b64
from tests.etcd import EtcdCluster
from tests.helpers import Process, start_gateway

PREFIX = "/bench-fleet/"
TXN_OPS = 128  # etcd's default --max-txn-ops
USERS_COUNT = 100
OBSERVER = "observer"  # owns the revoked keys and the key the watches are made with
OBSERVER_KEY = "observer-watch"
WATCH_PATH = "/kubernetes/management/apis/management.loft.sh/v1/ownedaccesskeys?watch=1&timeoutSeconds=3600"
TRAFFIC_PATH = "/kubernetes/cluster/sim/version"
SETTLE_SECONDS = 30.0  # how long after the last revocation a gateway may take before its miss is counted


def secret(name: str) -> str:
    return f"secret-of-{name}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (a gateway's supervisor and its worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_seconds(pid) + sum(tree_cpu_seconds(int(child)) for child in children)


def revision_of(store: EtcdStore) -> int:
    return int(store.client.call("kv/range", {"key": b64(PREFIX), "count_only": True})["header"]["revision"])


def fill(store: EtcdStore, keys: int, revoked: set[int]) -> None:
    """`keys` keys of USERS_COUNT users; the numbers in `revoked`, and OBSERVER_KEY, are OBSERVER's."""
    users = [User(f"user-{number}", subject=f"user-{number}") for number in range(USERS_COUNT)] + [User(OBSERVER)]
    names = [(f"key-{number}", OBSERVER if number in revoked else f"user-{number % USERS_COUNT}")
             for number in range(keys)] + [(OBSERVER_KEY, OBSERVER)]
    objects = [(USERS, user) for user in users] + [
        (ACCESS_KEYS, AccessKey(name, "User", owner, None, key_digest(secret(name)), created=time.time()))
        for name, owner in names]
    for start in range(0, len(objects), TXN_OPS):
        store.client.txn([], [{"request_put": {"key": b64(f"{PREFIX}{kind.folder}{obj.name}"), "value": b64(kind.encode(obj))}}
                              for kind, obj in objects[start:start + TXN_OPS]])


def gateway_config(port: int, etcd: EtcdCluster, cluster_url: str, ca_file: Path, token_file: Path) -> str:
    endpoints = ", ".join(f'"{endpoint}"' for endpoint in etcd.endpoints)
    return f"""
        [server]
        listen = "127.0.0.1:{port}"
        workers = 1
        shutdown_grace = 1
        watch_termination_period = 0

        [[clusters]]
        name = "sim"
        server = "{cluster_url}"
        ca_file = "{ca_file}"
        token_file = "{token_file}"

        [state]
        backend = "etcd"
        endpoints = [{endpoints}]
        prefix = "{PREFIX}"
        timeout = 30
    """


class Watch:
    """One gateway's ownedaccesskeys watch as OBSERVER: when each key's DELETED event was read."""

    def __init__(self, port: int, expected_keys: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        self.connection.request("GET", WATCH_PATH, headers={"Authorization": f"Bearer {secret(OBSERVER_KEY)}"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()
        self.gone: dict[str, float] = {}
        self.listed = threading.Semaphore(0)  # released once the first list of OBSERVER's keys has come
        self.expected_keys = expected_keys
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        added = 0
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            while line := self.response.readline():
                now = time.time()
                event = orjson.loads(line)
                if event["type"] == "DELETED":
                    self.gone[event["object"]["metadata"]["name"]] = now
                elif event["type"] == "ADDED":
                    added += 1
                    if added == self.expected_keys:
                        self.listed.release()

    def close(self) -> None:
        # Shut down first: the reading thread holds the response's buffer lock, which close() would wait for.
        if self.connection.sock is not None:
            with contextlib.suppress(OSError):
                self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.connection.close()


def answers(port: int, names: list[str]) -> list[int]:
    """The status a gateway answers a request with each of the keys `names`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        statuses = []
        for name in names:
            connection.request("GET", TRAFFIC_PATH, headers={"Authorization": f"Bearer {secret(name)}"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        return statuses
    finally:
        connection.close()


def traffic(ports: list[int], keys: int, rate: float, watched: list[str]) -> None:
    """The traffic process: `rate` requests a second to each gateway with random keys, until SIGTERM.
    Prints a JSON line: answers by status, and (port, key, sent at, status) of every request with a `watched` key."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    statuses: Counter[int] = Counter()
    watched_requests: list[tuple[int, str, float, int]] = []
    lock = threading.Lock()
    watched_names = set(watched)

    def drive(port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        due = time.monotonic() + random.uniform(0, 1 / rate)  # gateways' requests spread over the period
        while not stop.is_set():
            stop.wait(max(0.0, due - time.monotonic()))
            due += 1 / rate
            # One request in ten with a key due to be revoked, so the check after revocations has requests to look at.
            name = random.choice(watched) if random.random() < 0.1 else f"key-{random.randrange(keys)}"
            sent = time.time()
            try:
                connection.request("GET", TRAFFIC_PATH, headers={"Authorization": f"Bearer {secret(name)}"})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                status = 0  # no answer: counted apart
            with lock:
                statuses[status] += 1
                if name in watched_names:
                    watched_requests.append((port, name, sent, status))
        connection.close()
    threads = [threading.Thread(target=drive, args=(port,)) for port in ports]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    for thread in threads:
        thread.join()
    print(orjson.dumps({"statuses": statuses, "watched": watched_requests}, option=orjson.OPT_NON_STR_KEYS).decode(),
          flush=True)


def run(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    etcd = EtcdCluster(folder / "etcd")
    cluster = start_devcluster(folder / "cluster", seed=False)
    gateways: list[Process] = []
    watches: list[Watch] = []
    load: subprocess.Popen[str] | None = None
    try:
        store = EtcdStore(etcd.config(PREFIX, timeout=30.0))
        numbers = random.sample(range(args.keys), args.revocations)
        fill(store, args.keys, set(numbers))
        ports = []
        for number in range(args.gateways):  # one after another: 20 first loads at once would only measure the start
            port = free_port()
            gateway_folder = folder / f"gateway-{number}"
            gateway_folder.mkdir()
            gateways.append(start_gateway(gateway_config(port, etcd, cluster.url, cluster.ca_file,
                                                         cluster.gateway_token_file), gateway_folder, timeout=120))
            ports.append(port)
        watches = [Watch(port, args.revocations + 1) for port in ports]
        for watch in watches:
            assert watch.listed.acquire(timeout=60), "a gateway's watch did not list the observer's keys"
        revoked_names = [f"key-{number}" for number in numbers]
        load = subprocess.Popen([sys.executable, "-m", "bench.etcd_fleet", "--traffic", ",".join(map(str, ports)),
                                 "--keys", str(args.keys), "--rate", str(args.rate), "--watched", ",".join(revoked_names)],
                                stdout=subprocess.PIPE, text=True)
        assert load.stdout is not None and load.stdout.readline() == "ready\n"
        time.sleep(args.warmup)  # a first round of activity flushes (every 5 s) before the window opens
        etcd_pid = etcd.processes[0].pid  # type: ignore[union-attr]
        gateway_cpu = sum(tree_cpu_seconds(gateway.popen.pid) for gateway in gateways)
        cpu, revision, started = cpu_seconds(etcd_pid), revision_of(store), time.monotonic()
        revoked: dict[str, float] = {}
        lags, commits = [], []  # how late each revocation was committed against its slot; how long its commit took
        for slot, name in enumerate(revoked_names):
            due = started + slot * args.interval  # a fixed clock: a slow revocation does not push the next one back
            time.sleep(max(0.0, due - time.monotonic()))
            # From the request, not the commit's return: a gateway can apply the watch event before the
            # revoker's own reply arrives, and the propagation must not come out negative.
            revoked[name] = time.time()
            before = time.monotonic()
            store.revoke_access_key(name)
            commits.append(time.monotonic() - before)
            lags.append(time.monotonic() - due)
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline and any(len(watch.gone) < len(revoked) for watch in watches):
            time.sleep(0.05)
        window = time.monotonic() - started
        cpu, revisions = cpu_seconds(etcd_pid) - cpu, revision_of(store) - revision
        gateway_cpu = sum(tree_cpu_seconds(gateway.popen.pid) for gateway in gateways) - gateway_cpu
        load.send_signal(signal.SIGTERM)
        refusals = Counter(status for port in ports for status in answers(port, list(revoked)))
        output, _ = load.communicate(timeout=60)
        report = orjson.loads(output.splitlines()[-1])
        latencies, missing = [], 0
        for watch in watches:
            missing += sum(name not in watch.gone for name in revoked)
            latencies += [watch.gone[name] - at for name, at in revoked.items() if name in watch.gone]
        gone_at = {(port, name): at for port, watch in zip(ports, watches) for name, at in watch.gone.items()}
        after_gone = [request for request in report["watched"] if (request[0], request[1]) in gone_at
                      and request[2] > gone_at[request[0], request[1]]]
        served_after_gone = sum(status != 401 for *_, status in after_gone)
        store.close()
    finally:
        for watch in watches:
            watch.close()
        if load is not None and load.poll() is None:
            load.kill()
        for gateway in gateways:  # all at once: each takes shutdown_grace
            if gateway.popen.poll() is None:
                gateway.popen.send_signal(signal.SIGTERM)
        for gateway in gateways:
            gateway.stop()
        cluster.stop()
        etcd.stop()
        shutil.rmtree(folder, ignore_errors=True)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")  # never beyond the max
    requests = sum(report["statuses"].values())
    print(f"{args.gateways} gateways, {args.keys} keys, {args.revocations} revocations every {args.interval * 1000:.0f} ms "
          f"({len(latencies)} propagations, {missing} not seen)")
    print(f"propagation: p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {quantiles[98] * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms")
    print(f"revoker: committed p50 {statistics.median(lags) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms after its slot; "
          f"a commit took p50 {statistics.median(commits) * 1000:.1f} ms, max {max(commits) * 1000:.1f} ms; "
          f"{args.revocations} revocations took {(args.revocations - 1) * args.interval + lags[-1]:.1f} s "
          f"(pace {(args.revocations - 1) * args.interval:.1f} s)")
    print(f"etcd: {cpu / window * 100:.1f} % of a core over {window:.1f} s; {revisions / window:.1f} writes/s "
          f"({args.revocations / window:.1f} revocations/s, {(revisions - args.revocations) / window:.1f} activity/s)")
    print(f"gateways: {gateway_cpu / window * 100:.1f} % of a core together over the window; traffic: {requests} requests "
          f"({args.rate:g}/s per gateway), answers {dict(sorted(report['statuses'].items()))}; "
          f"{len(after_gone)} sent with a key after its gateway reported it gone, {served_after_gone} of them not refused")
    print(f"after the run, every revoked key on every gateway: answers {dict(sorted(refusals.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--revocations", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=3.0, help="requests a second to each gateway")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds of traffic before the first revocation")
    parser.add_argument("--traffic", metavar="PORTS", help=argparse.SUPPRESS)
    parser.add_argument("--watched", metavar="NAMES", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.traffic:
        traffic([int(port) for port in args.traffic.split(",")], args.keys, args.rate, args.watched.split(","))
    else:
        run(args)


if __name__ == "__main__":
    main()
