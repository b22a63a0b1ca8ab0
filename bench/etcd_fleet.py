"""A large fleet on one etcd: how fast a revocation reaches every gateway, and what it costs etcd.

    .venv/bin/python -m bench.etcd_fleet [--gateways 20] [--keys 10000] [--revocations 100] [--interval 0.1]

Starts one etcd member (Debian's etcd-server) in a temporary folder, writes `--keys` access keys
(of 100 users), then starts `--gateways` processes that each run the gateway's state reader
(fastproxy.store.etcd.EtcdReader on uvloop: the part of a gateway a revocation goes through) and
record the activity of 10 random keys every 100 ms, as a busy gateway's workers would. It revokes
one key every `--interval` seconds on a fixed clock (a slow revocation does not delay the next; how
late the revoker committed is printed), and prints the propagation (revocation requested -> gone from
each process's snapshot) p50/p99/max over every (revocation, process), etcd's CPU over the run,
and etcd's write rate (revisions per second) split into revocations and activity.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastproxy.config import EtcdConfig
from fastproxy.store.base import AccessKey, User, key_digest
from fastproxy.store.etcd import ACCESS_KEYS, USERS, EtcdReader, EtcdStore
from fastproxy.store.etcd_client import b64
from tests.etcd import EtcdCluster

PREFIX = "/bench-fleet/"
TXN_OPS = 128  # etcd's default --max-txn-ops
USES_PER_SECOND = 100  # distinct keys each reader records activity of: 10 every 100 ms


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def revision_of(store: EtcdStore) -> int:
    return int(store.client.call("kv/range", {"key": b64(PREFIX), "count_only": True})["header"]["revision"])


def fill(store: EtcdStore, keys: int) -> None:
    users = [User(f"user-{number}", subject=f"user-{number}") for number in range(100)]
    objects = [(USERS, user) for user in users] + [
        (ACCESS_KEYS, AccessKey(f"key-{number}", "User", f"user-{number % 100}", None, key_digest(f"secret-{number}"),
                                created=time.time())) for number in range(keys)]
    for start in range(0, len(objects), TXN_OPS):
        store.client.txn([], [{"request_put": {"key": b64(f"{PREFIX}{kind.folder}{obj.name}"), "value": b64(kind.encode(obj))}}
                              for kind, obj in objects[start:start + TXN_OPS]])


def reader(endpoint: str, keys: int) -> None:
    """One gateway's reader: prints `NAME TIME` as each key leaves its snapshot, until SIGTERM."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        state = EtcdReader(EtcdStore(EtcdConfig((endpoint,), PREFIX, timeout=30.0)))
        known = set(state.snapshot.access_keys)

        def changed(snapshot) -> None:
            nonlocal known
            now = time.time()
            for name in known - snapshot.access_keys.keys():
                print(name, now, flush=True)
            known = set(snapshot.access_keys)
        state.subscribe(changed)
        state.start(loop)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        while not stop.is_set():
            state.record_activity({f"key-{random.randrange(keys)}": time.time() for _ in range(USES_PER_SECOND // 10)})
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass
        state.close()
        print("writes", state.writes, flush=True)
    uvloop.run(main())


def run(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    etcd = EtcdCluster(folder)
    processes: list[subprocess.Popen[str]] = []
    try:
        store = EtcdStore(etcd.config(PREFIX, timeout=30.0))
        fill(store, args.keys)
        for _ in range(args.gateways):  # one after another: 20 first loads at once would only measure the start
            process = subprocess.Popen([sys.executable, "-m", "bench.etcd_fleet", "--reader", etcd.endpoints[0],
                                        "--keys", str(args.keys)], stdout=subprocess.PIPE, text=True)
            processes.append(process)
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        etcd_pid = etcd.processes[0].pid  # type: ignore[union-attr]
        cpu, revision, started = cpu_seconds(etcd_pid), revision_of(store), time.monotonic()
        revoked: dict[str, float] = {}
        lags = []  # how late each revocation was committed against its slot on the fixed clock
        for slot, number in enumerate(random.sample(range(args.keys), args.revocations)):
            due = started + slot * args.interval  # a fixed clock: a slow revocation does not push the next one back
            time.sleep(max(0.0, due - time.monotonic()))
            # From the request, not the commit's return: a reader can apply the watch event before the
            # revoker's own reply arrives, and the propagation must not come out negative.
            revoked[f"key-{number}"] = time.time()
            store.revoke_access_key(f"key-{number}")
            lags.append(time.monotonic() - due)
        time.sleep(1.0)
        window = time.monotonic() - started
        cpu, revisions = cpu_seconds(etcd_pid) - cpu, revision_of(store) - revision
        for process in processes:
            process.send_signal(signal.SIGTERM)
        latencies, missing, activity_writes = [], 0, 0
        for process in processes:
            output, _ = process.communicate(timeout=120)
            seen = {}
            for line in output.splitlines():
                name, value = line.split()
                if name == "writes":
                    activity_writes += int(value)
                else:
                    seen[name] = float(value)
            missing += sum(name not in seen for name in revoked)
            latencies += [seen[name] - at for name, at in revoked.items() if name in seen]
        store.close()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        etcd.stop()
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")  # never beyond the max
    print(f"{args.gateways} readers, {args.keys} keys, {args.revocations} revocations every {args.interval * 1000:.0f} ms "
          f"({len(latencies)} propagations, {missing} not seen)")
    print(f"propagation: p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {quantiles[98] * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms")
    print(f"revoker: committed p50 {statistics.median(lags) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms after its slot; "
          f"{args.revocations} revocations took {(args.revocations - 1) * args.interval + lags[-1]:.1f} s "
          f"(pace {(args.revocations - 1) * args.interval:.1f} s)")
    print(f"etcd: {cpu / window * 100:.1f} % of a core over {window:.1f} s; {revisions / window:.1f} writes/s "
          f"({args.revocations / window:.1f} revocations/s, {(revisions - args.revocations) / window:.1f} activity/s; "
          f"{activity_writes} activity transactions for {args.gateways * USES_PER_SECOND} key uses/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--revocations", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--reader", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        reader(args.reader, args.keys)
    else:
        run(args)


if __name__ == "__main__":
    main()
