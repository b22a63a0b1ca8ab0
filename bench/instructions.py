"""Instructions per small GET, counted by callgrind: the cost of a change or an observer, exactly.

    python -m bench.instructions [--requests N] [--targets fastproxy-bare,fastproxy-metrics,...]
                                 [--baseline REVISION] [--path PATH]

Time on a shared machine moves by several percent between runs; the instructions a process
executes for the same requests do not (callgrind counts them, whatever else the machine does),
so a 3% budget can be checked at all. Each target (`fastproxy` and the opt-in variants of
bench/targets.py, each also as of `--baseline REVISION`) runs one worker under `valgrind --tool=callgrind`
in front of the bench's nginx upstream (TLS to it, plain HTTP from the client, an access key and
impersonation, as in `scripts/bench`); after a warm-up the counters are zeroed, N keep-alive GETs
are made one after another, and the counters dumped: every thread of the gateway counted (the
audit and access log writers included), the once-a-second tick too. Under callgrind a request
takes ~50x longer, so the tick weighs ~50x more per request than it does at full speed: the
figures overstate, never understate, the tick's share.

Writes bench/results/<stamp>-instructions.md (and latest-instructions.md).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .__main__ import RESULTS, prepare, raise_open_file_limit
from .processes import PROXY_CPU, Process, free_port, wait_until_ready
from .targets import VARIANTS, baseline_source, fastproxy_argv, fastproxy_config
from .upstream import SMALL_PATH

WARM_UP = 300
CALLGRIND_START = 240.0  # seconds a gateway may take to start under callgrind


def count(setup, name: str, extra: str, source: Path | None, requests: int, path: str) -> int:
    """Instructions the gateway executed for `requests` GETs of `path` after a warm-up."""
    port = free_port()
    out = setup.workdir / f"callgrind-{name}.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            *fastproxy_argv(fastproxy_config(setup, port, False, extra, source))]
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    process = Process(name, argv, PROXY_CPU, setup.workdir, env=env)
    try:
        headers = {"Authorization": f"Bearer {setup.access_key}"}
        target = f"/kubernetes/cluster/bench{path}"
        wait_until_ready(process, f"http://127.0.0.1:{port}{target}", headers, timeout=CALLGRIND_START)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        _get(connection, target, headers, WARM_UP)
        _control(process, "--zero")
        _get(connection, target, headers, requests)
        _control(process, "--dump")
        connection.close()
    finally:
        process.stop()
    dumps = sorted(setup.workdir.glob(f"callgrind-{name}.out.*"))
    if not dumps:
        raise SystemExit(f"{name}: callgrind wrote no dump\n{process.log_tail()}")
    return _total(dumps[0])


def _get(connection: http.client.HTTPConnection, target: str, headers: dict[str, str], times: int) -> None:
    for _ in range(times):
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"GET {target}: HTTP {response.status}")


def _control(process: Process, action: str) -> None:
    done = subprocess.run(["callgrind_control", action, str(process.pid)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or "OK" not in done.stdout:
        raise SystemExit(f"callgrind_control {action}: {done.stdout}{done.stderr}")


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"{dump}: no totals line")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="GETs counted per target (default 2000)")
    parser.add_argument("--targets", default="fastproxy-bare,fastproxy-metrics,fastproxy",
                        help=f"comma list of fastproxy, {', '.join(VARIANTS)} (default: the bare gateway, "
                             "metrics alone, the defaults); the first is the one the others are compared with")
    parser.add_argument("--baseline", metavar="REVISION",
                        help="also count each target as of this git revision (first, and compared with)")
    parser.add_argument("--path", default=SMALL_PATH, help=f"the cluster path asked for (default {SMALL_PATH})")
    args = parser.parse_args()
    names = args.targets.split(",")
    unknown = [name for name in names if name != "fastproxy" and name not in VARIANTS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    raise_open_file_limit()
    started = datetime.datetime.now(datetime.UTC)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="fastproxy-instructions-") as workdir:
        setup = prepare(Path(workdir), argparse.Namespace(targets=[], list_mb=1, watch_events_per_second=100,
                                                          workloads=["get"]), 4096)
        try:
            # Each target as of the baseline first, then as it is here.
            source = baseline_source(args.baseline, Path(workdir)) if args.baseline else None
            runs = [(f"{name}@{args.baseline}", VARIANTS.get(name, ""), source) for name in names] if source else []
            runs += [(name, VARIANTS.get(name, ""), None) for name in names]
            for name, extra, source in runs:
                print(f"{name}: counting {args.requests} GETs under callgrind ...", file=sys.stderr, flush=True)
                total = count(setup, name.replace("@", "-"), extra, source, args.requests, args.path)
                rows.append((name, total / args.requests))
                print(f"    {total / args.requests:,.0f} instructions per request", file=sys.stderr, flush=True)
        finally:
            setup.upstream.stop()
    first = rows[0][1]
    command = shlex.join(["python", "-m", "bench.instructions", *sys.argv[1:]])
    counted = dict(rows)
    against = f" × {args.baseline} |" if args.baseline else ""
    lines = [f"# Instructions per small GET ({started:%Y-%m-%d %H:%M} UTC)", "", f"`{command}`", "",
             f"| target | instructions / request | × {rows[0][0]} |{against}", "|---|---:|---:|" + ("---:|" if against else "")]
    for name, per in rows:
        before = counted.get(f"{name}@{args.baseline}")
        versus = (f" {per / before:.3f} |" if before else " |") if against else ""
        lines.append(f"| {name} | {per:,.0f} | {per / first:.3f} |{versus}")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{started:%Y%m%dT%H%M%SZ}-instructions.md"
    path.write_text(text)
    shutil.copyfile(path, RESULTS / "latest-instructions.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
