"""Which etcd client the state store uses: its own client of etcd's v3 JSON gateway
(fastproxy/store/etcd_client.py, http.client + orjson) against aetcd (asyncio over grpcio), on
what the store does, in one run on one etcd:

- import: seconds to import the client in a fresh interpreter;
- load: one range of the whole prefix (`--keys` keys of ~300 bytes), the readers' start and reload;
- txn: `--writes` puts one after another, each comparing the key's mod_revision (every write);
- watch: a watcher on the prefix while another connection puts `--writes` keys; delivery latency
  (p50/p99) from each value's embedded clock, and the watcher process's CPU per event;
- RSS of the process after all that.

    python -m bench.etcd_client [--keys 10000] [--writes 500] [--aetcd-python /tmp/aetcd-venv/bin/python]

aetcd is not a dependency of the project: install it into a venv of its own
(`python3 -m venv /tmp/aetcd-venv && /tmp/aetcd-venv/bin/pip install aetcd`). Each client runs in a
child process of its own (`--child json|aetcd`), its figures printed as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "/bench/"
VALUE_BYTES = 300


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[max(0, int(len(ordered) * 0.99) - 1)]}


def _value(stamp: float) -> bytes:
    return json.dumps({"at": stamp}).encode().ljust(VALUE_BYTES)


# --- the project's client --------------------------------------------------------------------

def child_json(endpoint: str, keys: int, writes: int) -> dict:
    began = time.perf_counter()
    from fastproxy.config import EtcdConfig
    from fastproxy.store.etcd_client import EtcdClient, b64
    imported = time.perf_counter() - began
    client = EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=PREFIX))
    figures: dict = {"import_s": imported}

    loads, cpu = [], _cpu()
    for _ in range(5):
        started = time.perf_counter()
        _, found = client.range(PREFIX)
        loads.append(time.perf_counter() - started)
    assert len(found) == keys, len(found)
    figures["load"] = {"median_ms": 1000 * statistics.median(loads), "cpu_ms": 1000 * (_cpu() - cpu) / 5}

    key = f"{PREFIX}txn"
    _, revision, _ = client.txn([], [{"request_put": {"key": b64(key), "value": b64(b"0")}}])  # its mod_revision
    times, cpu = [], _cpu()
    for i in range(writes):
        started = time.perf_counter()
        ok, revision, _ = client.txn([{"key": b64(key), "target": "MOD", "mod_revision": str(revision)}],
                                     [{"request_put": {"key": b64(key), "value": b64(str(i))}}])
        times.append(time.perf_counter() - started)
        assert ok
    figures["txn"] = {**_quantiles(times), "cpu_us_per_op": 1e6 * (_cpu() - cpu) / writes}

    writer = EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=PREFIX))
    start = client.range(PREFIX)[0] + 1
    latencies: list[float] = []
    ready = threading.Event()

    def put_all() -> None:
        ready.wait()
        for i in range(writes):
            writer.txn([], [{"request_put": {"key": b64(f"{PREFIX}w/{i}"), "value": b64(_value(time.time()))}}])
            time.sleep(0.002)
    thread = threading.Thread(target=put_all)
    thread.start()
    cpu = _cpu()
    for batch in client.watch(PREFIX, start, idle_timeout=10):
        ready.set()
        now = time.time()
        for event in batch:
            latencies.append(now - json.loads(event.kv.value)["at"])
        if len(latencies) >= writes:
            break
    thread.join()
    # The writer thread's puts run in this process too: its share is measured alone below and taken off.
    solo = _cpu()
    for i in range(writes):
        writer.txn([], [{"request_put": {"key": b64(f"{PREFIX}x/{i}"), "value": b64(_value(time.time()))}}])
    writer_cpu = _cpu() - solo
    figures["watch"] = {**_quantiles(latencies),
                        "cpu_us_per_event": 1e6 * max(0.0, solo - cpu - writer_cpu) / writes}
    figures["rss_mib"] = _rss_mib()
    return figures


# --- aetcd -----------------------------------------------------------------------------------

def child_aetcd(endpoint: str, keys: int, writes: int) -> dict:
    import asyncio
    began = time.perf_counter()
    import aetcd
    imported = time.perf_counter() - began
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)

    async def run() -> dict:
        figures: dict = {"import_s": imported}
        async with aetcd.Client(host, int(port)) as client:
            loads, cpu = [], _cpu()
            for _ in range(5):
                started = time.perf_counter()
                found = await client.get_prefix(PREFIX.encode())
                loads.append(time.perf_counter() - started)
            assert len(found) == keys, len(found)
            figures["load"] = {"median_ms": 1000 * statistics.median(loads), "cpu_ms": 1000 * (_cpu() - cpu) / 5}

            key = f"{PREFIX}txn".encode()
            await client.put(key, b"0")
            revision, times, cpu = (await client.get(key)).mod_revision, [], _cpu()
            for i in range(writes):
                started = time.perf_counter()
                ok, answers = await client.transaction(
                    compare=[client.transactions.mod(key) == revision],
                    success=[client.transactions.put(key, str(i).encode())], failure=[])
                times.append(time.perf_counter() - started)
                assert ok
                revision = answers[0].response_put.header.revision  # the put's revision: the key's mod_revision
            figures["txn"] = {**_quantiles(times), "cpu_us_per_op": 1e6 * (_cpu() - cpu) / writes}

            latencies: list[float] = []
            watch = await client.watch_prefix(PREFIX.encode() + b"w/")

            async def put_all() -> None:
                async with aetcd.Client(host, int(port)) as writer:
                    for i in range(writes):
                        await writer.put(f"{PREFIX}w/{i}".encode(), _value(time.time()))
                        await asyncio.sleep(0.002)
            writing = asyncio.ensure_future(put_all())
            cpu = _cpu()
            async for event in watch:
                latencies.append(time.time() - json.loads(event.kv.value)["at"])
                if len(latencies) >= writes:
                    break
            await writing
            solo = _cpu()
            async with aetcd.Client(host, int(port)) as writer:
                for i in range(writes):
                    await writer.put(f"{PREFIX}x/{i}".encode(), _value(time.time()))
            writer_cpu = _cpu() - solo
            await watch.cancel()
            figures["watch"] = {**_quantiles(latencies),
                                "cpu_us_per_event": 1e6 * max(0.0, solo - cpu - writer_cpu) / writes}
        figures["rss_mib"] = _rss_mib()
        return figures
    return asyncio.run(run())


# --- the driver ------------------------------------------------------------------------------

def seed(endpoint: str, keys: int) -> None:
    from fastproxy.config import EtcdConfig
    from fastproxy.store.etcd_client import EtcdClient, b64
    client = EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=PREFIX))
    for start in range(0, keys, 100):  # etcd takes at most 128 operations in one transaction
        client.txn([], [{"request_put": {"key": b64(f"{PREFIX}k/{i:06d}"), "value": b64(_value(0.0))}}
                        for i in range(start, min(keys, start + 100))])
    client.close()


def clear(endpoint: str) -> None:
    from fastproxy.config import EtcdConfig
    from fastproxy.store.etcd_client import EtcdClient, b64, prefix_end
    client = EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=PREFIX))
    client.txn([], [{"request_delete_range": {"key": b64(f"{PREFIX}w/"), "range_end": prefix_end(f"{PREFIX}w/")}},
                    {"request_delete_range": {"key": b64(f"{PREFIX}x/"), "range_end": prefix_end(f"{PREFIX}x/")}},
                    {"request_delete_range": {"key": b64(f"{PREFIX}txn")}}])
    client.close()


def run_child(python: str, which: str, endpoint: str, keys: int, writes: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([python, "-m", "bench.etcd_client", "--child", which, "--endpoint", endpoint,
                             "--keys", str(keys), "--writes", str(writes)],
                            capture_output=True, text=True, env=env, cwd=root, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"the {which} client failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(figures: dict[str, dict], keys: int, writes: int) -> str:
    rows = [("import, s", "import_s", None), ("load of the prefix, median ms", "load", "median_ms"),
            ("load of the prefix, CPU ms", "load", "cpu_ms"), ("txn with compare, p50 ms", "txn", "p50_ms"),
            ("txn with compare, p99 ms", "txn", "p99_ms"), ("txn with compare, CPU µs", "txn", "cpu_us_per_op"),
            ("watch delivery, p50 ms", "watch", "p50_ms"), ("watch delivery, p99 ms", "watch", "p99_ms"),
            ("watch, CPU µs per event", "watch", "cpu_us_per_event"), ("RSS after, MiB", "rss_mib", None)]
    names = list(figures)
    lines = [f"{keys:,} keys of {VALUE_BYTES} bytes, {writes} writes; one etcd member on loopback", "",
             "| | " + " | ".join(names) + " | " + " / ".join(reversed(names)) + " |",
             "|---|" + "---:|" * (len(names) + 1)]
    for label, group, field in rows:
        values = [figures[name][group] if field is None else figures[name][group][field] for name in names]
        ratio = values[-1] / values[0] if len(values) == 2 and values[0] else float("nan")
        lines.append(f"| {label} | " + " | ".join(f"{v:.3g}" for v in values) + f" | {ratio:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--aetcd-python", default="/tmp/aetcd-venv/bin/python")
    parser.add_argument("--child", choices=("json", "aetcd"))
    parser.add_argument("--endpoint")
    args = parser.parse_args()
    if args.child:
        run = child_json if args.child == "json" else child_aetcd
        print(json.dumps(run(args.endpoint, args.keys, args.writes)))
        return
    from tests.etcd import EtcdCluster
    with tempfile.TemporaryDirectory() as folder:
        cluster = EtcdCluster(Path(folder))
        try:
            endpoint = cluster.endpoints[0]
            seed(endpoint, args.keys)
            figures = {}
            for name, python in (("JSON gateway", sys.executable), ("aetcd", args.aetcd_python)):
                figures[name] = run_child(python, "json" if python == sys.executable else "aetcd",
                                          endpoint, args.keys, args.writes)
                clear(endpoint)
        finally:
            cluster.stop()
    table = report(figures, args.keys, args.writes)
    print(table)
    out = Path(__file__).parent / "results" / f"etcd_client-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.md"
    out.write_text(f"`python -m bench.etcd_client --keys {args.keys} --writes {args.writes}`\n\n{table}\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
