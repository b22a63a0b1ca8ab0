"""What Python's cyclic garbage collector costs a worker under small-GET load, per observer set.

    python -m bench.gc_probe [--targets fastproxy-bare,fastproxy-metrics,fastproxy] [--seconds 10]

Each target (bench/targets.py VARIANTS) runs one worker pinned to CPU 0 in front of the bench's
nginx upstream, with a `sitecustomize` that times every collection through `gc.callbacks`; wrk
(64 connections, CPU 1) loads it for the given seconds. Printed per target: requests per second,
the worker's CPU seconds, and per generation the collections and the seconds they took.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .__main__ import prepare
from .processes import LOAD_CPU, PROXY_CPU, Process, free_port, wait_until_ready
from .targets import VARIANTS, fastproxy_argv, fastproxy_config
from .upstream import SMALL_PATH

# Loaded by the worker at start-up (its folder first on PYTHONPATH); the totals are rewritten at
# each collection, so the file holds them as of the last one.
TIMER = '''
import gc, os, time
_began, _totals = {}, [[0, 0.0] for _ in range(3)]
def _timed(phase, info):
    generation = info["generation"]
    if phase == "start":
        _began[generation] = time.perf_counter()
        return
    _totals[generation][0] += 1
    _totals[generation][1] += time.perf_counter() - _began.pop(generation)
    cpu = os.times()
    with open(os.path.join(os.environ["GC_PROBE_DIR"], f"gc-{os.getpid()}"), "w") as out:
        out.write(" ".join(map(str, [cpu.user + cpu.system, *(f for total in _totals for f in total)])))
gc.callbacks.append(_timed)
'''


def probe(setup, target: str, seconds: int, folder: Path) -> str:
    for old in folder.glob("gc-*"):
        old.unlink()
    port = free_port()
    config = fastproxy_config(setup, port, False, VARIANTS.get(target, ""))
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "GC_PROBE_DIR": str(folder)}
    process = Process(target, fastproxy_argv(config), PROXY_CPU, setup.workdir, env=env)
    try:
        url = f"http://127.0.0.1:{port}/kubernetes/cluster/bench{SMALL_PATH}"
        headers = {"Authorization": f"Bearer {setup.access_key}"}
        wait_until_ready(process, url, headers)
        wrk = subprocess.run(["taskset", "-c", str(LOAD_CPU), "wrk", "-c", "64", "-t", "1", "-d", str(seconds),
                              "-H", f"Authorization: Bearer {setup.access_key}", url],
                             capture_output=True, text=True, check=True).stdout
    finally:
        process.stop()
    rate = next(line.split()[1] for line in wrk.splitlines() if line.startswith("Requests/sec"))
    reports = [path.read_text().split() for path in folder.glob("gc-*")]
    if not reports:
        return f"{target}: {rate} requests/s, no collection at all"
    lines = []
    for report in reports:  # the worker's, and the master's if it collected
        cpu, *figures = map(float, report)
        spent = sum(figures[1::2])
        lines.append(f"{target}: {rate} requests/s; CPU {cpu:.2f} s; collections (count, s) young {figures[0]:.0f} "
                     f"{figures[1]:.3f}, middle {figures[2]:.0f} {figures[3]:.3f}, full {figures[4]:.0f} "
                     f"{figures[5]:.3f}; {spent / cpu:.1%} of the CPU")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="fastproxy-bare,fastproxy-metrics,fastproxy",
                        help="fastproxy and its VARIANTS (bench/targets.py)")
    parser.add_argument("--seconds", type=int, default=10, help="wrk's window per target")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fastproxy-gc-"))
    setup = prepare(workdir, argparse.Namespace(targets=[], workloads="get", list_mb=1,
                                                watch_events_per_second=100), 4096)
    folder = workdir / "probe"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(TIMER)
    try:
        for target in args.targets.split(","):
            print(probe(setup, target, args.seconds, folder), flush=True)
    finally:
        setup.upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
